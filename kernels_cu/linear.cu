// Fully connected layers as a small hand GEMM, for the layer sizes where a launch costs more than
// its arithmetic (LeNet-5's 400-120-84-10): forward with its bias and ReLU in the epilogue, and the
// whole backward (input gradient, weight gradient, bias gradient) in one launch.
//
// Versions: linear_forward_v1, linear_backward_v1.
//
// linear_forward_v1(input, weight, bias, rows, in_features, out_features, has_bias, relu, output)
//   input (rows, in_features), weight (out_features, in_features), bias (out_features,) (any
//   float array when !has_bias: never read), output (rows, out_features), all float32 row-major.
//   output = input weight^T (+ bias), then max(., 0) when relu (x < 0 ? 0 : x: NaN propagates,
//   as relu_forward_v1).
//   Launch: block 256, grid (ceil(out_features / 32), ceil(rows / 32)), no dynamic shared memory.
//
// linear_backward_v1(grad_output, input, weight, rows, in_features, out_features, input_tiles,
//                    mask_input, weight_from, weight_to, grad_input, grad_weight, grad_bias)
//   One grouped launch of two GEMMs: blocks [0, input_tiles) compute 32x32 tiles of
//     grad_input (rows, in_features) = grad_output (rows, out_features) weight,
//   times [input > 0] when mask_input (the input is the output of a ReLU whose backward is folded
//   in: the gradient w.r.t. that ReLU's input, bit-equal to relu_backward_v1 of the product);
//   the blocks after them compute tiles of the extended weight gradient
//     [grad_weight | grad_bias] (out_features, in_features + 1) = grad_output^T [input | 1],
//   the bias gradient being the column of the product against a constant 1. Only its columns
//   [weight_from, weight_to) are computed: [0, in_features] for both gradients, [0, in_features)
//   for the weight's alone, [in_features, in_features] for the bias's alone (a frozen weight).
//   input_tiles is 0 when no input gradient is wanted.
//   Every output element is one thread's fixed-order sum: deterministic, no atomics.
//   An output that is not computed may be any float array (never written).
//   Launch: block 256, grid (input_tiles + weight tiles), no dynamic shared memory.
//
// Tiling: a block computes a 32 x 32 tile of C = A B over K, 32 values of K at a time through
// shared memory (k-major, pitch 33: the stores of either loader mapping and the reads of the
// product hit distinct banks); 16 x 16 threads, each owning 2 x 2 outputs 16 apart. An operand
// tile is loaded along K when K is its contiguous dimension (coalesced) and across otherwise.
// Smaller than gemm_core.cuh's tiles (its narrowest is 32 x 128 at 8 x 8 per thread): the
// layers this serves have 10 to 120 outputs, where a 128-wide tile would be mostly padding.
//
// Limits: rows, in_features, out_features < 2^31 - 32; element offsets are 64-bit.

namespace linear {

constexpr int TILE = 32;
constexpr int BK = 32;
constexpr int PITCH = TILE + 1;
constexpr int THREADS = 256;
constexpr int SPAN = 16;  // threads per tile side; each thread covers outputs t and t + 16

// Element (outer, k) of an operand is data[outer * stride_outer + k * stride_k] for outer < extent
// and k < depth; outer == ones_at reads 1 (the bias column). Zero outside.
struct Operand {
    const float* data;
    long long stride_outer, stride_k;
    int extent, ones_at;

    __device__ __forceinline__ float at(int outer, int k, int depth) const
    {
        if (outer >= extent || k >= depth) return 0.0f;
        if (outer == ones_at) return 1.0f;
        return data[outer * stride_outer + k * stride_k];
    }
};

// tile[k][o] = operand(first + o, k0 + k), for o < TILE and k < BK.
__device__ __forceinline__ void load_tile(float (&tile)[BK][PITCH], const Operand& op, int first, int k0, int depth)
{
    const bool along_k = op.stride_k == 1;
#pragma unroll
    for (int i = 0; i < TILE * BK / THREADS; ++i) {
        const int e = threadIdx.x + i * THREADS;
        const int o = along_k ? e / BK : e % TILE;
        const int k = along_k ? e % BK : e / TILE;
        tile[k][o] = op.at(first + o, k0 + k, depth);
    }
}

// acc[r][c] = sum_k a(row0 + ty + 16 r, k) b(col0 + tx + 16 c, k), in increasing k. Every thread
// of the block calls it (it holds barriers).
__device__ __forceinline__ void tile_product(float (&acc)[2][2], const Operand& a, const Operand& b, int row0,
                                             int col0, int depth)
{
    __shared__ float a_tile[BK][PITCH];
    __shared__ float b_tile[BK][PITCH];
    const int tx = threadIdx.x % SPAN, ty = threadIdx.x / SPAN;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < 2; ++c) acc[r][c] = 0.0f;
    for (int k0 = 0; k0 < depth; k0 += BK) {
        load_tile(a_tile, a, row0, k0, depth);
        load_tile(b_tile, b, col0, k0, depth);
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < BK; ++k) {
            const float a0 = a_tile[k][ty], a1 = a_tile[k][ty + SPAN];
            const float b0 = b_tile[k][tx], b1 = b_tile[k][tx + SPAN];
            acc[0][0] = fmaf(a0, b0, acc[0][0]);
            acc[0][1] = fmaf(a0, b1, acc[0][1]);
            acc[1][0] = fmaf(a1, b0, acc[1][0]);
            acc[1][1] = fmaf(a1, b1, acc[1][1]);
        }
        __syncthreads();  // before the next tiles overwrite what this one read
    }
}

// store(row, col, value) for each of this thread's outputs of tile_product that falls inside the
// rows x cols product (the epilogues differ only in what they write where).
template <class Store>
__device__ __forceinline__ void store_tile(const float (&acc)[2][2], int row0, int col0, int rows, int cols,
                                           Store store)
{
    const int tx = threadIdx.x % SPAN, ty = threadIdx.x / SPAN;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + ty + r * SPAN;
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int col = col0 + tx + c * SPAN;
            if (row < rows && col < cols) store(row, col, acc[r][c]);
        }
    }
}

}  // namespace linear

extern "C" __global__ void __launch_bounds__(256) linear_forward_v1(
    const float* __restrict__ input, const float* __restrict__ weight, const float* __restrict__ bias, int rows,
    int in_features, int out_features, bool has_bias, bool relu, float* __restrict__ output)
{
    using namespace linear;
    const int row0 = blockIdx.y * TILE, col0 = blockIdx.x * TILE;
    const Operand a{input, in_features, 1, rows, -1};
    const Operand b{weight, in_features, 1, out_features, -1};
    float acc[2][2];
    tile_product(acc, a, b, row0, col0, in_features);
    store_tile(acc, row0, col0, rows, out_features, [&](int row, int col, float v) {
        if (has_bias) v += bias[col];
        if (relu) v = v < 0.0f ? 0.0f : v;
        output[(long long)row * out_features + col] = v;
    });
}

extern "C" __global__ void __launch_bounds__(256) linear_backward_v1(
    const float* __restrict__ grad_output, const float* __restrict__ input, const float* __restrict__ weight,
    int rows, int in_features, int out_features, int input_tiles, bool mask_input, int weight_from, int weight_to,
    float* __restrict__ grad_input, float* __restrict__ grad_weight, float* __restrict__ grad_bias)
{
    using namespace linear;
    float acc[2][2];
    const int block = blockIdx.x;  // uniform over the block: both branches hold their barriers whole
    if (block < input_tiles) {
        const int column_tiles = (in_features + TILE - 1) / TILE;
        const int row0 = block / column_tiles * TILE, col0 = block % column_tiles * TILE;
        const Operand a{grad_output, out_features, 1, rows, -1};  // (n, m)
        const Operand b{weight, 1, in_features, in_features, -1};  // (j, m) = weight[m][j]
        tile_product(acc, a, b, row0, col0, out_features);
        store_tile(acc, row0, col0, rows, in_features, [&](int row, int col, float v) {
            const long long at = (long long)row * in_features + col;
            grad_input[at] = !mask_input || input[at] > 0.0f ? v : 0.0f;
        });
        return;
    }
    const int column_tiles = (weight_to - weight_from + TILE - 1) / TILE;
    const int tile = block - input_tiles;
    const int row0 = tile / column_tiles * TILE, col0 = weight_from + tile % column_tiles * TILE;
    const Operand a{grad_output, 1, out_features, out_features, -1};        // (m, n) = grad_output[n][m]
    const Operand b{input, 1, in_features, in_features + 1, in_features};  // (j, n) = input[n][j], 1 at j = in
    tile_product(acc, a, b, row0, col0, rows);
    store_tile(acc, row0, col0, out_features, weight_to, [&](int row, int col, float v) {
        if (col == in_features)
            grad_bias[row] = v;
        else
            grad_weight[(long long)row * in_features + col] = v;
    });
}

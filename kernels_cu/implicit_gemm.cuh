// implicit_gemm.cuh: the block tiling shared by the convolution kernels (conv2d_forward.cu,
// conv2d_backward_data.cu, conv2d_backward_filter.cu), each an implicit GEMM C (M x N) = A (M x K)
// times B (K x N) whose tiles are gathered straight from the tensors.
//
// Provides: the tile constants; TileThread, a thread's place in the block tile; the two ways a
// thread loads its share of a K tile and stores it into shared memory; pixel_of and KernelTap,
// the decoding of a GEMM index into (image, pixel) and of a K index into (channel, i, j); the
// K loop with register prefetch and the 4x4 micro-tile FMAs (gemm_k_loop); the write of a
// micro-tile into an NCHW tensor (store_nchw). Everything is __forceinline__ and every loop of
// fixed trip count unrolled into the calling kernel: the kernels are compared with cuDNN, and a
// call or a runtime-indexed register array (local memory) would cost more than the code saved.
//
// Layout: a block computes a TILE_M x TILE_N tile of C, TILE_K values of K at a time. Both
// shared tiles are k-major, TILE_K rows of a pitch in floats (the tile's M or N columns, plus
// padding where the stores need it), declared by the kernel as float4 [TILE_K][pitch / 4] for
// the alignment of the 128-bit reads and written as floats. The kernel declares them (a
// __shared__ variable of a __device__ function is charged to every kernel of its file by the
// emulated device) and passes them in.
// Launch: block exactly THREADS, 1-D (the load mappings cover a tile with THREADS threads); grid
// x over the N tiles, y over the M tiles, z left to the kernel (split-K). Thread tid owns the
// micro-tile at rows MICRO*ty + r and columns MICRO*tx + c (r, c < MICRO) of the block tile,
// with tx = tid % THREADS_N, ty = tid / THREADS_N. Every thread of the block must reach
// gemm_k_loop (it holds __syncthreads()).

constexpr int TILE_M = 64;
constexpr int TILE_N = 64;
constexpr int TILE_K = 16;
constexpr int THREADS = 256;
// 4x4 outputs per thread, so that each K step reads its 4 A and 4 B values with one 128-bit
// shared load each: with scalar loads, shared-memory instructions (8 per 16 FMAs) would bound
// the inner loop.
constexpr int MICRO = 4;
constexpr int THREADS_N = TILE_N / MICRO;
static_assert(TILE_M == TILE_N, "one load mapping and one padded pitch serve both tiles");
static_assert(THREADS_N * (TILE_M / MICRO) == THREADS, "one micro-tile per thread covers the block tile");

// Loads along K, for an operand contiguous along K: thread tid loads row k = tid % TILE_K of the
// K tile, columns tid / TILE_K + ALONG_K_STRIDE * r for r < ALONG_K_LOADS.
constexpr int ALONG_K_LOADS = TILE_M * TILE_K / THREADS;
constexpr int ALONG_K_STRIDE = THREADS / TILE_K;
// Loads along the tile's columns, for an operand contiguous along M or N: thread tid loads
// column tid % TILE_N, rows k .. k + ALONG_N_LOADS - 1 with k = tid / TILE_N * ALONG_N_LOADS.
constexpr int ALONG_N_LOADS = TILE_N * TILE_K / THREADS;
// Pitch in floats of a tile stored along K: +4 so that the stores (16 lanes of a warp on 16
// k-rows) spread over 8 banks instead of one, while rows stay 16-byte aligned for float4 reads.
// A tile stored along its columns needs no padding (consecutive lanes, consecutive floats).
constexpr int PADDED_PITCH = TILE_M + 4;

// This thread's place in the block tile and in both load mappings.
struct TileThread {
    int m0, n0;                        // the block tile's first row and column
    int tx, ty;                        // the micro-tile: rows MICRO*ty + r, columns MICRO*tx + c
    int along_k_row, along_k_column;   // loads along K: row of the K tile, first column
    int along_n_row, along_n_column;   // loads along N: first row of the K tile, column

    __device__ __forceinline__ TileThread()
    {
        const int tid = threadIdx.x;
        m0 = blockIdx.y * TILE_M;
        n0 = blockIdx.x * TILE_N;
        tx = tid % THREADS_N;
        ty = tid / THREADS_N;
        along_k_row = tid % TILE_K;
        along_k_column = tid / TILE_K;
        along_n_row = tid / TILE_N * ALONG_N_LOADS;
        along_n_column = tid % TILE_N;
    }
};

// Column n = image * plane + p, p = h * width + w, of a GEMM over the pixels of NCHW images.
struct Pixel {
    int image, p, h, w;
};

__device__ __forceinline__ Pixel pixel_of(int n, int plane, int width)
{
    const int image = n / plane;
    const int p = n - image * plane;
    const int h = p / width;
    return {image, p, h, p - h * width};
}

// Writes this thread's loads along K (row k, columns column + ALONG_K_STRIDE * r) into a tile.
template <int COLS4>
__device__ __forceinline__ void store_along_k(float4 (&tile)[TILE_K][COLS4], const float (&values)[ALONG_K_LOADS],
                                              int k, int column)
{
    float* const row = reinterpret_cast<float*>(tile[k]);
#pragma unroll
    for (int r = 0; r < ALONG_K_LOADS; ++r) row[column + ALONG_K_STRIDE * r] = values[r];
}

// Writes this thread's loads along N (rows k + r, one column) into a tile.
template <int COLS4>
__device__ __forceinline__ void store_along_n(float4 (&tile)[TILE_K][COLS4], const float (&values)[ALONG_N_LOADS],
                                              int k, int column)
{
#pragma unroll
    for (int r = 0; r < ALONG_N_LOADS; ++r) reinterpret_cast<float*>(tile[k + r])[column] = values[r];
}

// A K index k = (channel * kernel_h + i) * kernel_w + j of a convolution GEMM, for runs of
// consecutive k: decoded by division once, then stepped. An integer division costs ~20
// instructions, as much as a quarter of a tile's FMAs if done per element.
struct KernelTap {
    int channel, i, j;

    __device__ __forceinline__ KernelTap(int k, int taps, int kernel_w)
    {
        channel = k / taps;
        const int tap = k - channel * taps;
        i = tap / kernel_w;
        j = tap - i * kernel_w;
    }

    __device__ __forceinline__ void next(int kernel_h, int kernel_w)
    {
        if (++j == kernel_w) {
            j = 0;
            if (++i == kernel_h) {
                i = 0;
                ++channel;
            }
        }
    }
};

// acc += the A tile's rows MICRO*ty .. +MICRO-1 times the B tile's columns MICRO*tx .. +MICRO-1,
// over the TILE_K rows of both.
template <int A_COLS4, int B_COLS4>
__device__ __forceinline__ void multiply_tiles(float (&acc)[MICRO][MICRO], const float4 (&a_tile)[TILE_K][A_COLS4],
                                               const float4 (&b_tile)[TILE_K][B_COLS4], int tx, int ty)
{
#pragma unroll
    for (int k = 0; k < TILE_K; ++k) {
        const float4 a4 = a_tile[k][ty];
        const float4 b4 = b_tile[k][tx];
        const float a[MICRO] = {a4.x, a4.y, a4.z, a4.w};
        const float b[MICRO] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int r = 0; r < MICRO; ++r)
#pragma unroll
            for (int c = 0; c < MICRO; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
    }
}

// acc = this thread's micro-tile of the product over K indices [k_begin, k_end). load(k0) reads
// this thread's share of the K tile starting at k0 into the kernel's prefetch registers (zeros
// past k_end or outside the operands); store() writes those registers into a_tile and b_tile.
// The next tile is loaded while the current one is multiplied, so global latency overlaps the
// FMAs; the two barriers guard the tiles against the next store (first) and the reads of the
// current one (second).
template <int A_COLS4, int B_COLS4, class Load, class Store>
__device__ __forceinline__ void gemm_k_loop(float (&acc)[MICRO][MICRO], const float4 (&a_tile)[TILE_K][A_COLS4],
                                            const float4 (&b_tile)[TILE_K][B_COLS4], const TileThread& t,
                                            int k_begin, int k_end, Load load, Store store)
{
#pragma unroll
    for (int r = 0; r < MICRO; ++r)
#pragma unroll
        for (int c = 0; c < MICRO; ++c) acc[r][c] = 0.0f;

    load(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        store();
        __syncthreads();
        if (k0 + TILE_K < k_end) load(k0 + TILE_K);
        multiply_tiles(acc, a_tile, b_tile, t.tx, t.ty);
        __syncthreads();
    }
}

// Writes this thread's micro-tile of a product whose rows are the channels and whose columns are
// the (image, pixel) pairs of an NCHW tensor: out[image][m][p] = finish(m, acc) for rows m <
// channels and columns n = image * plane + p < columns. Offsets are 64-bit; each column is
// decoded once for its MICRO rows.
template <class Finish>
__device__ __forceinline__ void store_nchw(float* __restrict__ out, const float (&acc)[MICRO][MICRO], const TileThread& t,
                                           int channels, int columns, int plane, Finish finish)
{
#pragma unroll
    for (int c = 0; c < MICRO; ++c) {
        const int n = t.n0 + MICRO * t.tx + c;
        if (n >= columns) continue;
        const int image = n / plane;
        const int p = n - image * plane;
#pragma unroll
        for (int r = 0; r < MICRO; ++r) {
            const int m = t.m0 + MICRO * t.ty + r;
            if (m < channels) out[((long long)image * channels + m) * plane + p] = finish(m, acc[r][c]);
        }
    }
}

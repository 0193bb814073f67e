// tensorcore_gemm.cuh: the block tiling of the tensor-core convolutions (conv2d_tensorcore.cu),
// each an implicit GEMM C (M x N) = A (M x K) times B (K x N) whose operand tiles are gathered
// from the tensors by 4-byte cp.async copies (zero-filled outside them) and multiplied by
// mma.sync, TF32 m16n8k8 or BF16 m16n8k16, FP32 accumulate (ptx.cuh).
//
// Layout: a block computes a BM x BN tile of C, BK values of K at a time, with its four warps
// in a 2 x 2 grid of 32 x 32 warp tiles (2 x 4 mma tiles of 16 x 8 each). Both shared tiles are
// stored with K innermost, A as [BM][PITCH], B as [BN][PITCH], FP32 as copied; the operands are
// rounded to TF32 or BF16 as the fragments are read (so a tile is copied as raw bytes, which is
// what cp.async does): TF32 fragments through ldmatrix, BF16 ones as 64-bit pairs. PITCH =
// BK + 4 keeps rows 16-byte aligned and puts the eight rows a fragment load reads in distinct
// banks. Two stages: the copies of tile k+1 are in flight while tile k is multiplied.
// Launch: block exactly THREADS, 1-D; grid x over the N tiles, y over the M tiles, z left to the
// kernel (split-K). Every thread of the block must reach mma_k_loop (it holds __syncthreads()).
// Thread tid loads LOADS elements of each operand tile, in one of two mappings (load_slot):
// ALONG_K for an operand contiguous along K (consecutive threads take consecutive k), or
// ALONG_ROWS for one contiguous along its M or N index.

#include "ptx.cuh"

namespace tc {

constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 16;
constexpr int THREADS = 128;
constexpr int WARPS_N = 2;
constexpr int WARP_M = 32;
constexpr int WARP_N = 32;
constexpr int MMA_M = WARP_M / 16;  // mma tiles per warp along M
constexpr int MMA_N = WARP_N / 8;   // ... and along N
constexpr int PITCH = BK + 4;
constexpr int LOADS = BM * BK / THREADS;
static_assert(BM == BN, "one load mapping serves both tiles");
static_assert(PITCH % 4 == 0 && MMA_N % 2 == 0, "ldmatrix rows 16-byte aligned; B fragments loaded in pairs");
static_assert((BM / WARP_M) * (BN / WARP_N) * 32 == THREADS, "one warp tile per warp covers the block tile");
static_assert((THREADS / BM) * LOADS == BK, "a loader along the rows steps its k by BK per tile (TapCursor)");

enum Precision { TF32 = 0, BF16 = 1 };
enum Mapping { ALONG_K, ALONG_ROWS };

struct __align__(16) Stage {  // 16: ldmatrix row addresses
    float a[BM][PITCH];
    float b[BN][PITCH];
};

using Accumulators = float[MMA_M][MMA_N][4];

// Element r (< LOADS) of this thread's share of a BM x BK tile: its row and its k in the tile.
struct Slot {
    int row, k;
};

template <Mapping MAP>
__device__ __forceinline__ Slot load_slot(int r)
{
    const int tid = threadIdx.x;
    if (MAP == ALONG_K) return {tid / BK + (THREADS / BK) * r, tid % BK};
    return {tid % BM, tid / BM + (THREADS / BM) * r};
}

// A K index k = (channel * kernel_h + i) * kernel_w + j of a convolution GEMM, decoded once and
// then stepped: a loader whose k advances by a fixed stride (THREADS / BM per element along the
// rows, which adds up to BK per tile) keeps one cursor instead of dividing per element.
struct TapCursor {
    int channel, i, j;

    __device__ __forceinline__ TapCursor(int k, int kernel_h, int kernel_w)
    {
        const int taps = kernel_h * kernel_w;
        channel = k / taps;
        i = (k - channel * taps) / kernel_w;
        j = k - channel * taps - i * kernel_w;
    }

    template <int STEPS>
    __device__ __forceinline__ void advance(int kernel_h, int kernel_w)
    {
#pragma unroll
        for (int s = 0; s < STEPS; ++s)
            if (++j == kernel_w) {
                j = 0;
                if (++i == kernel_h) {
                    i = 0;
                    ++channel;
                }
            }
    }
};

// One 4-byte element of a tile: src when `inside`, else a zero fill that reads nothing (src must
// still be a valid address expression; any pointer into the operand does).
__device__ __forceinline__ void copy_element(float* dst, const float* src, bool inside)
{
    cp_async_ca<4>(dst, src, inside ? 4 : 0);
}

// acc += this warp's share of A (rows) times B (columns) over the BK values of one stage.
__device__ __forceinline__ void multiply_stage(Accumulators& acc, const Stage& s, int precision)
{
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wm = (warp / WARPS_N) * WARP_M, wn = (warp % WARPS_N) * WARP_N;
    if (precision == BF16) {
        static_assert(BK == 16, "one m16n8k16 step per stage");
        // Each BF16 register holds the pair of elements 2t, 2t + 1 of a row: one 64-bit load.
        const auto pair = [](const float* row, int k) {
            const float2 v = *reinterpret_cast<const float2*>(row + k);
            return pack_bf16x2(v.x, v.y);
        };
        unsigned int a[MMA_M][4], b[MMA_N][2];
#pragma unroll
        for (int mi = 0; mi < MMA_M; ++mi) {
            const float* r0 = s.a[wm + 16 * mi + g];
            const float* r1 = s.a[wm + 16 * mi + g + 8];
            a[mi][0] = pair(r0, 2 * t);
            a[mi][1] = pair(r1, 2 * t);
            a[mi][2] = pair(r0, 2 * t + 8);
            a[mi][3] = pair(r1, 2 * t + 8);
        }
#pragma unroll
        for (int ni = 0; ni < MMA_N; ++ni) {
            const float* column = s.b[wn + 8 * ni + g];
            b[ni][0] = pair(column, 2 * t);
            b[ni][1] = pair(column, 2 * t + 8);
        }
#pragma unroll
        for (int mi = 0; mi < MMA_M; ++mi)
#pragma unroll
            for (int ni = 0; ni < MMA_N; ++ni) mma_bf16_m16n8k16(acc[mi][ni], a[mi], b[ni]);
        return;
    }
    // TF32 fragments are 8x4 blocks of 32-bit elements, lane (g, t) holding element (g, t): the
    // layout ldmatrix gives for an 8x8 matrix of 16-bit halves, so one ldmatrix.x4 loads an A
    // fragment (blocks rows 0-7 / 8-15 by k 0-3 / 4-7) or two B fragments, in place of four
    // 32-bit shared loads. Lane 8i + j names row j of block i; rows are 16-byte aligned (PITCH).
    const int block = lane / 8, row = lane % 8;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
        unsigned int a[MMA_M][4], b[MMA_N][2];
#pragma unroll
        for (int mi = 0; mi < MMA_M; ++mi) {
            ldmatrix<4, false>(a[mi], &s.a[wm + 16 * mi + 8 * (block % 2) + row][kk + 4 * (block / 2)]);
#pragma unroll
            for (int i = 0; i < 4; ++i) a[mi][i] = to_tf32(__uint_as_float(a[mi][i]));
        }
#pragma unroll
        for (int ni = 0; ni < MMA_N; ni += 2) {
            unsigned int pair[4];
            ldmatrix<4, false>(pair, &s.b[wn + 8 * (ni + block / 2) + row][kk + 4 * (block % 2)]);
#pragma unroll
            for (int i = 0; i < 4; ++i) b[ni + i / 2][i % 2] = to_tf32(__uint_as_float(pair[i]));
        }
#pragma unroll
        for (int mi = 0; mi < MMA_M; ++mi)
#pragma unroll
            for (int ni = 0; ni < MMA_N; ++ni) mma_tf32_m16n8k8(acc[mi][ni], a[mi], b[ni]);
    }
}

// acc = this warp's share of the product over K indices [k_begin, k_end). load(stage, k0) issues
// this thread's cp.async copies of the A and B tiles starting at k0 into `stage` (zero fills past
// k_end and outside the operands); it is called for k0 = k_begin, k_begin + BK, ... in that order,
// once each, so a loader may step its indices from one call to the next. The copies of the next tile fly while the current one is
// multiplied: wait_group 1 leaves only them in flight, the first barrier makes every thread's
// landed copies visible, the second keeps the next load from overwriting a stage still read.
template <class Load>
__device__ __forceinline__ void mma_k_loop(Accumulators& acc, Stage (&stages)[2], int k_begin, int k_end,
                                           int precision, Load load)
{
#pragma unroll
    for (int mi = 0; mi < MMA_M; ++mi)
#pragma unroll
        for (int ni = 0; ni < MMA_N; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;
    if (k_begin >= k_end) return;  // the same for every thread of the block

    load(stages[0], k_begin);
    cp_async_commit();
    int current = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
        if (k0 + BK < k_end) load(stages[current ^ 1], k0 + BK);
        cp_async_commit();  // possibly empty: keeps "the most recent group" the next tile's
        cp_async_wait<1>();
        __syncthreads();
        multiply_stage(acc, stages[current], precision);
        __syncthreads();
        current ^= 1;
    }
    cp_async_wait_all();  // only the last, empty group is left; no copy outlives the loop
}

// Calls out(m, n, value) for every element of this thread's accumulators, at its row m and
// column n of C (unmasked: the caller checks the bounds).
template <class Out>
__device__ __forceinline__ void for_each_output(const Accumulators& acc, int m0, int n0, Out out)
{
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wm = m0 + (warp / WARPS_N) * WARP_M, wn = n0 + (warp % WARPS_N) * WARP_N;
#pragma unroll
    for (int mi = 0; mi < MMA_M; ++mi)
#pragma unroll
        for (int ni = 0; ni < MMA_N; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) out(wm + 16 * mi + g + 8 * (i / 2), wn + 8 * ni + 2 * t + i % 2, acc[mi][ni][i]);
}

}  // namespace tc

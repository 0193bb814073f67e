// conv2d_backward_filter.cu: gradients of conv2d with respect to its weight
// (torch.nn.grad.conv2d_weight) and its bias.
//
// Versions:
//   v1  conv2d_backward_filter_v1: implicit GEMM, 64x64 block tile, K step 16, 4x4 outputs per
//       thread fed by 128-bit shared loads, next K tile prefetched into registers (the tiling of
//       implicit_gemm.cuh); split-K across gridDim.z with atomicAdd.
//   v1  conv2d_bias_grad_v1: one block per output channel, shuffle + shared-memory tree reduction.
//   v2  conv2d_backward_filter_v2_<BM>x<BN>[_c4] (128x128, 128x64, 64x128): the block-tile GEMM
//       core of gemm_core.cuh with the backward-filter loaders of conv_tiles.cuh (N ordered tap-
//       major; _c4 for C_in % 4 == 0: a thread's 4 columns are one tap of 4 channels, one bounds
//       test); the bias gradient from the same launch; split-K partial sums into a workspace,
//       added by conv2d_split_k_reduce_v2 in a fixed order, so the result is the same to the bit
//       whatever order the blocks run in.
//
// conv2d_backward_filter_v1
//   grad_w[co][ci][i][j] += sum over n, oh, ow (within this block's K range) of
//       grad_out[n][co][oh][ow] * x[n][ci][oh*stride_h - pad_top + i*dil_h][ow*stride_w - pad_left + j*dil_w]
//   with zeros outside the input.
//   Layout: x (batch, c_in, height, width) NCHW; grad_out (batch, c_out, out_h, out_w) NCHW;
//   grad_w (c_out, c_in, kernel_h, kernel_w) OIHW, which the caller zero-fills: every block adds
//   its partial sums into it. float32, C-contiguous.
//   GEMM view: M = c_out, N = c_in*kernel_h*kernel_w, K = batch*out_h*out_w. Both tiles are read
//   with consecutive threads along K (the output pixels), the contiguous axis of both arrays;
//   each thread decodes its K index once per tile and its four N columns once.
//   Launch: grid (ceil(N / 64), ceil(c_out / 64), ceil(K / k_per_split)), block 256, no dynamic
//   shared memory (8.5 KB static); k_per_split a positive multiple of 16. Block z covers K indices
//   [z*k_per_split, min(K, (z+1)*k_per_split)).
//   Limits: K = batch*out_h*out_w and c_out*N below 2^31 - 64 (int, with a tile of headroom for the
//   unmasked tile indices); offsets into x, grad_out and grad_w are 64-bit; gridDim.y and
//   gridDim.z <= 65535, so c_out <= 4194240.
//   The float atomics make the summation order, and so the last bits, vary between runs on a GPU.
//
// conv2d_bias_grad_v1
//   grad_b[co] = sum over n, p of grad_out[n][co][p], p over the plane_size pixels of one plane.
//   Layout: grad_out (batch, c_out, plane_size) NCHW with plane_size = out_h*out_w; grad_b (c_out).
//   Launch: grid c_out, block 256, no dynamic shared memory (32 B static).
//   Limits: offsets 64-bit; each thread sums its pixels sequentially in float32, the block sums
//   the 256 partials as a tree, so the result is deterministic.

// conv2d_backward_filter_v2_<BM>x<BN>[_c4]
//   partials[z*split_stride + co*N + (ci*kernel_h + i)*kernel_w + j] = sum over the output pixels
//   k = (n, oh, ow) of split z, k in [z*k_per_split, min(K, (z+1)*k_per_split)) with
//   K = batch*out_h*out_w, of
//       grad_out[n][co][oh][ow] * x[n][ci][oh*stride_h - pad_top + i*dil_h][ow*stride_w - pad_left + j*dil_w]
//   (zeros outside x), N = c_in*kernel_h*kernel_w; with has_bias also
//   bias_partials[z*split_stride + co] = sum over the same pixels of grad_out[n][co][oh][ow]
//   (written by the blocks of column tile 0, after their K loop). Every element of split z is
//   written (no zero-fill needed); with one split, partials and bias_partials are the results.
//   Layout: x NCHW, grad_out NCHW, float32, C-contiguous. GEMM view: M = c_out, N = (tap,
//   channel) tap-major, K = the output pixels. d_a ... b_wrap_h: conv_tiles.cuh's PixelSteps for
//   this geometry (conv_gemm.filter_walk_steps). _c4 needs c_in % 4 == 0.
//   Launch: grid (ceil(N / BN), ceil(c_out / BM), splits), block BM*BN/64, no dynamic shared
//   memory; k_per_split a positive multiple of 8. Limits: kernel_h*kernel_w <= 256; x, grad_out
//   and c_out*(N + 1) elements, and K, below 2^31 - 128; gridDim.y, z <= 65535.
//
// conv2d_split_k_reduce_v2
//   sum = partials[i] + partials[size + i] + ... over z < splits, in order, for i < size; written
//   to out[i] for i < head, to out_tail[i - head] after (a split's weights, then its biases).
//   Launch: 1-D, ceil(size / 256) blocks of 256.

#include "implicit_gemm.cuh"
#include "conv_tiles.cuh"

constexpr int WARP = 32;

extern "C" __global__ void __launch_bounds__(256)
conv2d_backward_filter_v1(const float* __restrict__ x, const float* __restrict__ grad_out,
                          float* __restrict__ grad_w, int batch, int c_in, int height, int width, int c_out,
                          int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_top, int pad_left,
                          int dil_h, int dil_w, int out_h, int out_w, int k_per_split)
{
    __shared__ float4 a_tile[TILE_K][PADDED_PITCH / 4];
    __shared__ float4 b_tile[TILE_K][PADDED_PITCH / 4];

    const TileThread t;
    const int taps = kernel_h * kernel_w;
    const int patch = c_in * taps;
    const int plane = out_h * out_w;
    const int k_begin = blockIdx.z * k_per_split;
    // Not min(K, k_begin + k_per_split): for the last split that sum can pass 2^31 when K is near
    // it (k_begin < K, but k_begin + k_per_split < K + k_per_split), and wrap negative.
    const int k_end = k_begin + min(k_per_split, batch * plane - k_begin);

    // Both tiles are loaded along K: the output pixels, contiguous in grad_out and, up to the
    // stride, in x. This thread's B columns (ci, i, j): offset of the channel plane and of the tap.
    long long channel_offset[ALONG_K_LOADS];
    int tap_h[ALONG_K_LOADS], tap_w[ALONG_K_LOADS];
    bool column_ok[ALONG_K_LOADS];
#pragma unroll
    for (int r = 0; r < ALONG_K_LOADS; ++r) {
        const int n = t.n0 + t.along_k_column + ALONG_K_STRIDE * r;
        column_ok[r] = n < patch;
        const KernelTap tap(n, taps, kernel_w);
        channel_offset[r] = (long long)tap.channel * height * width;
        tap_h[r] = tap.i * dil_h;
        tap_w[r] = tap.j * dil_w;
    }

    float a_next[ALONG_K_LOADS], b_next[ALONG_K_LOADS];
    const auto load = [&](int k0) {
        const int k = k0 + t.along_k_row;
        const bool k_ok = k < k_end;
        // A k past the range decodes as pixel 0, so that its (masked) pointers stay inside the tensors.
        const Pixel at = pixel_of(k_ok ? k : 0, plane, out_w);
        const int ih0 = at.h * stride_h - pad_top;
        const int iw0 = at.w * stride_w - pad_left;
        const float* grad_pixel = grad_out + (long long)at.image * c_out * plane + at.p;
        const float* x_image = x + (long long)at.image * c_in * height * width;
#pragma unroll
        for (int r = 0; r < ALONG_K_LOADS; ++r) {
            const int m = t.m0 + t.along_k_column + ALONG_K_STRIDE * r;
            a_next[r] = (k_ok && m < c_out) ? __ldg(grad_pixel + (long long)m * plane) : 0.0f;
            const int ih = ih0 + tap_h[r];
            const int iw = iw0 + tap_w[r];
            const bool inside = k_ok && column_ok[r] && (unsigned)ih < (unsigned)height && (unsigned)iw < (unsigned)width;
            b_next[r] = inside ? __ldg(x_image + channel_offset[r] + (long long)ih * width + iw) : 0.0f;
        }
    };
    const auto store = [&] {
        store_along_k(a_tile, a_next, t.along_k_row, t.along_k_column);
        store_along_k(b_tile, b_next, t.along_k_row, t.along_k_column);
    };
    float acc[MICRO][MICRO];
    gemm_k_loop(acc, a_tile, b_tile, t, k_begin, k_end, load, store);

#pragma unroll
    for (int r = 0; r < MICRO; ++r) {
        const int m = t.m0 + MICRO * t.ty + r;
        if (m >= c_out) continue;
#pragma unroll
        for (int c = 0; c < MICRO; ++c) {
            const int n = t.n0 + MICRO * t.tx + c;
            if (n < patch) atomicAdd(grad_w + (long long)m * patch + n, acc[r][c]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
conv2d_bias_grad_v1(const float* __restrict__ grad_out, float* __restrict__ grad_b, int batch, int c_out,
                    int plane_size)
{
    __shared__ float warp_sums[THREADS / WARP];
    const int co = blockIdx.x;
    float sum = 0.0f;
    for (int image = 0; image < batch; ++image) {
        const float* row = grad_out + ((long long)image * c_out + co) * plane_size;
        for (int p = threadIdx.x; p < plane_size; p += blockDim.x) sum += __ldg(row + p);
    }
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (threadIdx.x % WARP == 0) warp_sums[threadIdx.x / WARP] = sum;
    __syncthreads();
    if (threadIdx.x < WARP) {
        sum = threadIdx.x < blockDim.x / WARP ? warp_sums[threadIdx.x] : 0.0f;
#pragma unroll
        for (int offset = WARP / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
        if (threadIdx.x == 0) grad_b[co] = sum;
    }
}

#define BACKWARD_FILTER_V2_PARAMS const float* __restrict__ x, const float* __restrict__ grad_out, float* __restrict__ partials, \
    float* __restrict__ bias_partials, int batch, int c_in, int height, int width, int c_out, int kernel_h, int kernel_w, \
    int stride_h, int stride_w, int pad_top, int pad_left, int dil_h, int dil_w, int out_h, int out_w, int k_per_split, \
    long long split_stride, int has_bias, float* __restrict__ grad_weight, float* __restrict__ grad_bias, \
    int* __restrict__ tickets, int last_block_reduce, int d_a, int d_b, int d_ih, int d_iw, int ih_end, int iw_end, int ih_wrap, int iw_wrap, \
    int a_wrap_h, int b_wrap_w, int b_wrap_h

// The body every v2 entry point below runs, with its tile and B loader.
template <int BM, int BN, bool SAME_TAP_RUNS>
__device__ __forceinline__ void backward_filter_v2(conv::Shared<BM, BN>& shared, BACKWARD_FILTER_V2_PARAMS)
{
    const conv::PixelSteps steps{d_a, d_b, d_ih, d_iw, ih_end, iw_end, ih_wrap, iw_wrap, a_wrap_h, b_wrap_w, b_wrap_h};
    conv::weight_gradient_gemm<BM, BN, SAME_TAP_RUNS>(
        shared, x, grad_out, conv::TapGrid{kernel_w, 0, dil_h, 0, dil_w}, partials, has_bias ? bias_partials : nullptr, split_stride,
        grad_weight, grad_bias, gridDim.z > 1 && last_block_reduce ? tickets : nullptr, batch,
        c_in, height, width, c_out, kernel_h * kernel_w, stride_h, stride_w, pad_top, pad_left, out_h, out_w,
        k_per_split, steps);
}

// An entry point's body: its static shared memory (declared in the kernel itself, not in the
// template) and the call with every parameter. The entry points' parameter list is the macro
// BACKWARD_FILTER_V2_PARAMS (kernel_source.parse_signatures reads it as the compilers do).
#define BACKWARD_FILTER_V2(BM, BN, SAME_TAP_RUNS)                                                                   \
    __shared__ __align__(16) conv::Shared<BM, BN> shared;                                                            \
    backward_filter_v2<BM, BN, SAME_TAP_RUNS>(shared, x, grad_out, partials, bias_partials, batch, c_in, height,      \
                                              width, c_out, kernel_h, kernel_w, stride_h, stride_w, pad_top,          \
                                              pad_left, dil_h, dil_w, out_h, out_w, k_per_split, split_stride,        \
                                              has_bias, grad_weight, grad_bias, tickets, last_block_reduce, d_a, d_b,  \
                                              d_ih, d_iw, ih_end, iw_end, ih_wrap, iw_wrap,                           \
                                              a_wrap_h, b_wrap_w, b_wrap_h)

extern "C" __global__ void __launch_bounds__(256, 2)
conv2d_backward_filter_v2_128x128(BACKWARD_FILTER_V2_PARAMS)
{
    BACKWARD_FILTER_V2(128, 128, false);
}

extern "C" __global__ void __launch_bounds__(256, 2)
conv2d_backward_filter_v2_128x128_c4(BACKWARD_FILTER_V2_PARAMS)
{
    BACKWARD_FILTER_V2(128, 128, true);
}

extern "C" __global__ void __launch_bounds__(128, 3)
conv2d_backward_filter_v2_128x64(BACKWARD_FILTER_V2_PARAMS)
{
    BACKWARD_FILTER_V2(128, 64, false);
}

extern "C" __global__ void __launch_bounds__(128, 3)
conv2d_backward_filter_v2_128x64_c4(BACKWARD_FILTER_V2_PARAMS)
{
    BACKWARD_FILTER_V2(128, 64, true);
}

extern "C" __global__ void __launch_bounds__(128, 3)
conv2d_backward_filter_v2_64x128(BACKWARD_FILTER_V2_PARAMS)
{
    BACKWARD_FILTER_V2(64, 128, false);
}

extern "C" __global__ void __launch_bounds__(128, 3)
conv2d_backward_filter_v2_64x128_c4(BACKWARD_FILTER_V2_PARAMS)
{
    BACKWARD_FILTER_V2(64, 128, true);
}

extern "C" __global__ void __launch_bounds__(256)
conv2d_split_k_reduce_v2(const float* __restrict__ partials, float* __restrict__ out, float* __restrict__ out_tail,
                         int splits, long long size, long long head)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= size) return;
    float sum = 0.0f;
    for (int z = 0; z < splits; ++z) sum += __ldg(partials + z * size + i);
    if (i < head)
        out[i] = sum;
    else
        out_tail[i - head] = sum;
}

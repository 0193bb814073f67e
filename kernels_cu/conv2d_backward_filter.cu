// conv2d_backward_filter.cu: gradients of conv2d with respect to its weight
// (torch.nn.grad.conv2d_weight) and its bias.
//
// Versions:
//   v1  conv2d_backward_filter_v1: implicit GEMM, 64x64 block tile, K step 16, 4x4 outputs per
//       thread fed by 128-bit shared loads, next K tile prefetched into registers; split-K
//       across gridDim.z with atomicAdd.
//   v1  conv2d_bias_grad_v1: one block per output channel, shuffle + shared-memory tree reduction.
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
//   Limits: K = batch*out_h*out_w and c_out*N below 2^31 (int); offsets into x, grad_out and
//   grad_w are 64-bit; gridDim.y and gridDim.z <= 65535, so c_out <= 4194240.
//   The float atomics make the summation order, and so the last bits, vary between runs on a GPU.
//
// conv2d_bias_grad_v1
//   grad_b[co] = sum over n, p of grad_out[n][co][p], p over the plane_size pixels of one plane.
//   Layout: grad_out (batch, c_out, plane_size) NCHW with plane_size = out_h*out_w; grad_b (c_out).
//   Launch: grid c_out, block 256, no dynamic shared memory (32 B static).
//   Limits: offsets 64-bit; each thread sums its pixels sequentially in float32, the block sums
//   the 256 partials as a tree, so the result is deterministic.

constexpr int TILE_M = 64;
constexpr int TILE_N = 64;
constexpr int TILE_K = 16;
constexpr int THREADS = 256;
// Each thread computes the 4x4 outputs at rows 4*ty + r and columns 4*tx + c (r, c < 4) of the
// block tile, so that each K step reads its 4 A and 4 B values with one 128-bit shared load each:
// with scalar loads, shared-memory instructions (8 per 16 FMAs) would bound the inner loop.
constexpr int MICRO = 4;
constexpr int THREADS_N = TILE_N / MICRO;
// Per K tile each thread loads LOADS values of each tile: one k row, columns LOAD_STRIDE apart.
constexpr int LOADS = TILE_M * TILE_K / THREADS;
constexpr int LOAD_STRIDE = THREADS / TILE_K;
// Row pitch of both tiles in floats: +4 so that the stores (16 lanes of a warp on 16 k-rows)
// spread over 8 banks instead of one, while rows stay 16-byte aligned for float4 reads.
static_assert(TILE_M == TILE_N, "both tiles share one load mapping and one pitch");
constexpr int PITCH = TILE_M + 4;
constexpr int WARP = 32;

extern "C" __global__ void __launch_bounds__(256)
conv2d_backward_filter_v1(const float* __restrict__ x, const float* __restrict__ grad_out,
                          float* __restrict__ grad_w, int batch, int c_in, int height, int width, int c_out,
                          int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_top, int pad_left,
                          int dil_h, int dil_w, int out_h, int out_w, int k_per_split)
{
    // Declared as float4 for the alignment of the 128-bit reads; written as floats.
    __shared__ float4 a_tile[TILE_K][PITCH / 4];
    __shared__ float4 b_tile[TILE_K][PITCH / 4];
    float* const a_store = reinterpret_cast<float*>(a_tile);
    float* const b_store = reinterpret_cast<float*>(b_tile);

    const int tid = threadIdx.x;
    const int tx = tid % THREADS_N;
    const int ty = tid / THREADS_N;
    const int m0 = blockIdx.y * TILE_M;
    const int n0 = blockIdx.x * TILE_N;
    const int taps = kernel_h * kernel_w;
    const int patch = c_in * taps;
    const int plane = out_h * out_w;
    const int k_begin = blockIdx.z * k_per_split;
    const int k_end = min(batch * plane, k_begin + k_per_split);

    // Both tiles are loaded as rows k0 + lane_k, columns lane_mn + LOAD_STRIDE*r.
    const int lane_k = tid % TILE_K;
    const int lane_mn = tid / TILE_K;

    // This thread's B columns (ci, i, j): offset of the channel plane and of the tap.
    long long channel_offset[LOADS];
    int tap_h[LOADS], tap_w[LOADS];
    bool column_ok[LOADS];
#pragma unroll
    for (int r = 0; r < LOADS; ++r) {
        const int n = n0 + lane_mn + LOAD_STRIDE * r;
        column_ok[r] = n < patch;
        const int ci = n / taps;
        const int tap = n - ci * taps;
        const int i = tap / kernel_w;
        channel_offset[r] = (long long)ci * height * width;
        tap_h[r] = i * dil_h;
        tap_w[r] = (tap - i * kernel_w) * dil_w;
    }

    float a_next[LOADS], b_next[LOADS];
    // Loads row k0 + lane_k of both tiles into a_next/b_next, zeros past the K range.
    auto load = [&](int k0) {
        const int k = k0 + lane_k;
        const bool k_ok = k < k_end;
        const int image = k_ok ? k / plane : 0;
        const int p = k - image * plane;
        const int oh = p / out_w;
        const int ih0 = oh * stride_h - pad_top;
        const int iw0 = (p - oh * out_w) * stride_w - pad_left;
        const float* grad_pixel = grad_out + (long long)image * c_out * plane + p;
        const float* x_image = x + (long long)image * c_in * height * width;
#pragma unroll
        for (int r = 0; r < LOADS; ++r) {
            const int m = m0 + lane_mn + LOAD_STRIDE * r;
            a_next[r] = (k_ok && m < c_out) ? __ldg(grad_pixel + (long long)m * plane) : 0.0f;
            const int ih = ih0 + tap_h[r];
            const int iw = iw0 + tap_w[r];
            const bool inside = k_ok && column_ok[r] && (unsigned)ih < (unsigned)height && (unsigned)iw < (unsigned)width;
            b_next[r] = inside ? __ldg(x_image + channel_offset[r] + (long long)ih * width + iw) : 0.0f;
        }
    };

    float acc[MICRO][MICRO];
#pragma unroll
    for (int r = 0; r < MICRO; ++r)
#pragma unroll
        for (int c = 0; c < MICRO; ++c) acc[r][c] = 0.0f;

    load(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += TILE_K) {
#pragma unroll
        for (int r = 0; r < LOADS; ++r) {
            a_store[lane_k * PITCH + lane_mn + LOAD_STRIDE * r] = a_next[r];
            b_store[lane_k * PITCH + lane_mn + LOAD_STRIDE * r] = b_next[r];
        }
        __syncthreads();
        if (k0 + TILE_K < k_end) load(k0 + TILE_K);
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
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < MICRO; ++r) {
        const int m = m0 + MICRO * ty + r;
        if (m >= c_out) continue;
#pragma unroll
        for (int c = 0; c < MICRO; ++c) {
            const int n = n0 + MICRO * tx + c;
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

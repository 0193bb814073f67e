// conv2d_backward_data.cu: gradient of conv2d with respect to its input (torch.nn.grad.conv2d_input).
//
// Versions:
//   v1  conv2d_backward_data_v1: implicit GEMM, 64x64 block tile, K step 16, 4x4 outputs per
//       thread fed by 128-bit shared loads, next K tile prefetched into registers while the
//       current one is multiplied.
//
// conv2d_backward_data_v1
//   grad_x[n][ci][y][x] = sum over co, i, j of w[co][ci][i][j] * grad_out[n][co][oh][ow]
//   over the (oh, ow) whose window tap (i, j) lands on (y, x): oh*stride_h - pad_top + i*dil_h = y,
//   i.e. (y + pad_top - i*dil_h) divisible by stride_h with quotient in [0, out_h), and alike for ow.
//   Layout: w (c_out, c_in, kernel_h, kernel_w) OIHW; grad_out (batch, c_out, out_h, out_w) NCHW;
//   grad_x (batch, c_in, height, width) NCHW, every element written. float32, C-contiguous.
//   GEMM view: M = c_in, N = batch*height*width, K = c_out*kernel_h*kernel_w. A = w seen as
//   (ci) x (co, i, j); the B tile is gathered from grad_out, zero where the divisibility or range
//   test fails. Each thread owns one input pixel column of the tile, decoded once.
//   Launch: grid (ceil(batch*height*width / 64), ceil(c_in / 64)), block 256, no dynamic shared
//   memory (8.3 KB static).
//   Limits: batch*height*width and c_out*c_in*kernel_h*kernel_w below 2^31 (int); offsets into
//   grad_out and grad_x are 64-bit; gridDim.y <= 65535, so c_in <= 4194240. With stride s > 1 only
//   about 1/s^2 of the K terms are non-zero, and they are still multiplied: the cost is that of
//   the stride-1 problem.

constexpr int TILE_M = 64;
constexpr int TILE_N = 64;
constexpr int TILE_K = 16;
constexpr int THREADS = 256;
// Each thread computes the 4x4 outputs at rows 4*ty + r and columns 4*tx + c (r, c < 4) of the
// block tile, so that each K step reads its 4 A and 4 B values with one 128-bit shared load each:
// with scalar loads, shared-memory instructions (8 per 16 FMAs) would bound the inner loop.
constexpr int MICRO = 4;
constexpr int THREADS_N = TILE_N / MICRO;
// Row pitch of the A tile in floats: +4 so that the transposed stores (16 lanes of a warp on 16
// k-rows) spread over 8 banks instead of one, while rows stay 16-byte aligned for float4 reads.
constexpr int A_PITCH = TILE_M + 4;
// Per K tile each thread loads A_LOADS weights (rows A_STRIDE apart, one k) and B_LOADS values of
// grad_out (one column, consecutive k).
constexpr int A_LOADS = TILE_M * TILE_K / THREADS;
constexpr int A_STRIDE = THREADS / TILE_K;
constexpr int B_LOADS = TILE_N * TILE_K / THREADS;

// Column k of the A tile, rows ci .. ci + (A_LOADS-1)*A_STRIDE: A[ci][k] is element (co, ci, tap)
// of the OIHW weight, k = co*taps + tap, decoded once for the four rows.
__device__ __forceinline__ void load_weight_rows(float* rows, const float* __restrict__ w, int ci, int k, int c_in,
                                                 int taps, int depth)
{
    const int co = k / taps;
    const float* tap_weights = w + (long long)co * c_in * taps + (k - co * taps);
#pragma unroll
    for (int r = 0; r < A_LOADS; ++r) {
        const int row = ci + A_STRIDE * r;
        rows[r] = (row < c_in && k < depth) ? __ldg(tap_weights + (long long)row * taps) : 0.0f;
    }
}

// Rows k .. k + B_LOADS - 1 of this thread's B column: grad_out at the output pixel whose tap
// (i, j) covers the column's input pixel, zero where none does. grad_image points at the column's
// image; (y_pad, x_pad) is its pixel in padded coordinates. The rows are consecutive taps, so k is
// decoded into (co, i, j) by division once and then stepped (a division costs ~20 instructions).
__device__ __forceinline__ void gather_grad_rows(float* rows, const float* __restrict__ grad_image, bool column_ok,
                                                 int k, int depth, int taps, int kernel_h, int kernel_w, int y_pad,
                                                 int x_pad, int stride_h, int stride_w, int dil_h, int dil_w,
                                                 int out_h, int out_w)
{
    int co = k / taps;
    int i = (k - co * taps) / kernel_w;
    int j = k - co * taps - i * kernel_w;
#pragma unroll
    for (int r = 0; r < B_LOADS; ++r) {
        const int th = y_pad - i * dil_h;
        const int tw = x_pad - j * dil_w;
        // oh and ow only count where th, tw >= 0: there truncating division is floor division.
        // Stride 1, the common case, skips the division (~20 instructions each) on a uniform branch.
        const int oh = stride_h == 1 ? th : th / stride_h;
        const int ow = stride_w == 1 ? tw : tw / stride_w;
        const bool hit = column_ok && k + r < depth && th >= 0 && tw >= 0 && oh * stride_h == th &&
                         ow * stride_w == tw && oh < out_h && ow < out_w;
        rows[r] = hit ? __ldg(grad_image + ((long long)co * out_h + oh) * out_w + ow) : 0.0f;
        if (++j == kernel_w) {
            j = 0;
            if (++i == kernel_h) {
                i = 0;
                ++co;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
conv2d_backward_data_v1(const float* __restrict__ w, const float* __restrict__ grad_out,
                        float* __restrict__ grad_x, int batch, int c_in, int height, int width, int c_out,
                        int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_top, int pad_left,
                        int dil_h, int dil_w, int out_h, int out_w)
{
    // Declared as float4 for the alignment of the 128-bit reads; written as floats.
    __shared__ float4 a_tile[TILE_K][A_PITCH / 4];
    __shared__ float4 b_tile[TILE_K][TILE_N / 4];
    float* const a_store = reinterpret_cast<float*>(a_tile);
    float* const b_store = reinterpret_cast<float*>(b_tile);

    const int tid = threadIdx.x;
    const int tx = tid % THREADS_N;
    const int ty = tid / THREADS_N;
    const int m0 = blockIdx.y * TILE_M;
    const int n0 = blockIdx.x * TILE_N;
    const int taps = kernel_h * kernel_w;
    const int depth = c_out * taps;
    const int plane = height * width;
    const int columns = batch * plane;

    const int a_k = tid % TILE_K;
    const int a_m = tid / TILE_K;
    const int b_n = tid % TILE_N;
    const int b_k = tid / TILE_N * B_LOADS;

    const int column = n0 + b_n;
    const bool column_ok = column < columns;
    int y_pad = 0, x_pad = 0;
    const float* grad_image = grad_out;
    if (column_ok) {
        const int image = column / plane;
        const int p = column - image * plane;
        const int y = p / width;
        y_pad = y + pad_top;
        x_pad = p - y * width + pad_left;
        grad_image = grad_out + (long long)image * c_out * out_h * out_w;
    }

    float a_next[A_LOADS], b_next[B_LOADS];
    load_weight_rows(a_next, w, m0 + a_m, a_k, c_in, taps, depth);
    gather_grad_rows(b_next, grad_image, column_ok, b_k, depth, taps, kernel_h, kernel_w, y_pad, x_pad, stride_h,
                     stride_w, dil_h, dil_w, out_h, out_w);

    float acc[MICRO][MICRO];
#pragma unroll
    for (int r = 0; r < MICRO; ++r)
#pragma unroll
        for (int c = 0; c < MICRO; ++c) acc[r][c] = 0.0f;

    for (int k0 = 0; k0 < depth; k0 += TILE_K) {
#pragma unroll
        for (int r = 0; r < A_LOADS; ++r) a_store[a_k * A_PITCH + a_m + A_STRIDE * r] = a_next[r];
#pragma unroll
        for (int r = 0; r < B_LOADS; ++r) b_store[(b_k + r) * TILE_N + b_n] = b_next[r];
        __syncthreads();
        const int k1 = k0 + TILE_K;
        if (k1 < depth) {
            load_weight_rows(a_next, w, m0 + a_m, k1 + a_k, c_in, taps, depth);
            gather_grad_rows(b_next, grad_image, column_ok, k1 + b_k, depth, taps, kernel_h, kernel_w, y_pad, x_pad,
                             stride_h, stride_w, dil_h, dil_w, out_h, out_w);
        }
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
    for (int c = 0; c < MICRO; ++c) {
        const int n = n0 + MICRO * tx + c;
        if (n >= columns) continue;
        const int image = n / plane;
        const int p = n - image * plane;
#pragma unroll
        for (int r = 0; r < MICRO; ++r) {
            const int m = m0 + MICRO * ty + r;
            if (m < c_in) grad_x[((long long)image * c_in + m) * plane + p] = acc[r][c];
        }
    }
}

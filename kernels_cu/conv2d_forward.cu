// conv2d_forward.cu: 2-D convolution forward (cross-correlation, as torch.nn.functional.conv2d).
//
// Versions:
//   v1  conv2d_forward_v1: implicit GEMM, 64x64 block tile, K step 16, 4x4 outputs per thread
//       fed by 128-bit shared loads, next K tile prefetched into registers while the current one
//       is multiplied.
//
// conv2d_forward_v1
//   out[n][co][oh][ow] = act(bias[co] + sum over ci, i, j of
//                            w[co][ci][i][j] * x[n][ci][oh*stride_h - pad_top + i*dil_h][ow*stride_w - pad_left + j*dil_w])
//   with zeros outside the input, act = ReLU when relu != 0, identity otherwise.
//   Layout: x (batch, c_in, height, width) NCHW; w (c_out, c_in, kernel_h, kernel_w) OIHW, i.e. a
//   c_out x K row-major matrix with K = c_in*kernel_h*kernel_w; bias (c_out); out (batch, c_out,
//   out_h, out_w) NCHW. float32, C-contiguous. Padding is given as top/left offsets plus the output
//   size, so asymmetric padding (PyTorch's 'same' with an even kernel) needs nothing special.
//   GEMM view: M = c_out, N = batch*out_h*out_w, K. The B tile (K x N) is gathered straight from x
//   (no im2col buffer): each thread owns one output pixel column of the tile, decoded once.
//   Launch: grid (ceil(batch*out_h*out_w / 64), ceil(c_out / 64)), block 256, no dynamic shared
//   memory (8.3 KB static).
//   Limits: batch*out_h*out_w and c_out*K below 2^31 (int); offsets into x and out are 64-bit;
//   gridDim.y <= 65535, so c_out <= 4194240.

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
// Per K tile each thread loads A_LOADS weights (rows A_STRIDE apart, one k) and B_LOADS input
// values (one column, consecutive k).
constexpr int A_LOADS = TILE_M * TILE_K / THREADS;
constexpr int A_STRIDE = THREADS / TILE_K;
constexpr int B_LOADS = TILE_N * TILE_K / THREADS;

__device__ __forceinline__ float load_weight(const float* __restrict__ w, int m, int k, int c_out, int patch)
{
    return (m < c_out && k < patch) ? __ldg(w + (long long)m * patch + k) : 0.0f;
}

// Rows k .. k + B_LOADS - 1 of this thread's B column. x_image points at the column's image and
// (ih0, iw0) is its window's top-left corner. The rows are consecutive taps, so k is decoded into
// (channel, i, j) by division once and then stepped: integer division costs ~20 instructions,
// as much as a quarter of the tile's FMAs if done per element.
__device__ __forceinline__ void gather_input_rows(float* rows, const float* __restrict__ x_image, bool column_ok,
                                                  int k, int patch, int taps, int kernel_h, int kernel_w, int ih0,
                                                  int iw0, int dil_h, int dil_w, int height, int width)
{
    int c = k / taps;
    int i = (k - c * taps) / kernel_w;
    int j = k - c * taps - i * kernel_w;
#pragma unroll
    for (int r = 0; r < B_LOADS; ++r) {
        const int ih = ih0 + i * dil_h;
        const int iw = iw0 + j * dil_w;
        // One unsigned compare per axis tests both "above/left of the input" and "past its end".
        const bool inside = column_ok && k + r < patch && (unsigned)ih < (unsigned)height && (unsigned)iw < (unsigned)width;
        rows[r] = inside ? __ldg(x_image + ((long long)c * height + ih) * width + iw) : 0.0f;
        if (++j == kernel_w) {
            j = 0;
            if (++i == kernel_h) {
                i = 0;
                ++c;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
conv2d_forward_v1(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                  float* __restrict__ out, int batch, int c_in, int height, int width, int c_out, int kernel_h,
                  int kernel_w, int stride_h, int stride_w, int pad_top, int pad_left, int dil_h, int dil_w,
                  int out_h, int out_w, int relu)
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
    const int patch = c_in * taps;
    const int plane = out_h * out_w;
    const int columns = batch * plane;

    // Loads of A: w[m0 + a_m + A_STRIDE*r][k0 + a_k], consecutive threads along k (contiguous in w).
    const int a_k = tid % TILE_K;
    const int a_m = tid / TILE_K;
    // Loads of B: column b_n of the tile, rows b_k .. b_k + 3, consecutive threads along the output pixels.
    const int b_n = tid % TILE_N;
    const int b_k = tid / TILE_N * B_LOADS;

    const int column = n0 + b_n;
    const bool column_ok = column < columns;
    int ih0 = 0, iw0 = 0;
    const float* x_image = x;
    if (column_ok) {
        const int image = column / plane;
        const int p = column - image * plane;
        const int oh = p / out_w;
        ih0 = oh * stride_h - pad_top;
        iw0 = (p - oh * out_w) * stride_w - pad_left;
        x_image = x + (long long)image * c_in * height * width;
    }

    float a_next[A_LOADS], b_next[B_LOADS];
#pragma unroll
    for (int r = 0; r < A_LOADS; ++r) a_next[r] = load_weight(w, m0 + a_m + A_STRIDE * r, a_k, c_out, patch);
    gather_input_rows(b_next, x_image, column_ok, b_k, patch, taps, kernel_h, kernel_w, ih0, iw0, dil_h, dil_w,
                      height, width);

    float acc[MICRO][MICRO];
#pragma unroll
    for (int r = 0; r < MICRO; ++r)
#pragma unroll
        for (int c = 0; c < MICRO; ++c) acc[r][c] = 0.0f;

    for (int k0 = 0; k0 < patch; k0 += TILE_K) {
#pragma unroll
        for (int r = 0; r < A_LOADS; ++r) a_store[a_k * A_PITCH + a_m + A_STRIDE * r] = a_next[r];
#pragma unroll
        for (int r = 0; r < B_LOADS; ++r) b_store[(b_k + r) * TILE_N + b_n] = b_next[r];
        __syncthreads();
        const int k1 = k0 + TILE_K;
        if (k1 < patch) {
#pragma unroll
            for (int r = 0; r < A_LOADS; ++r) a_next[r] = load_weight(w, m0 + a_m + A_STRIDE * r, k1 + a_k, c_out, patch);
            gather_input_rows(b_next, x_image, column_ok, k1 + b_k, patch, taps, kernel_h, kernel_w, ih0, iw0, dil_h,
                              dil_w, height, width);
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
            if (m >= c_out) continue;
            float value = acc[r][c] + __ldg(bias + m);
            if (relu) value = fmaxf(value, 0.0f);
            out[((long long)image * c_out + m) * plane + p] = value;
        }
    }
}

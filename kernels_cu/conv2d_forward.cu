// conv2d_forward.cu: 2-D convolution forward (cross-correlation, as torch.nn.functional.conv2d).
//
// Versions:
//   v1  conv2d_forward_v1: implicit GEMM, 64x64 block tile, K step 16, 4x4 outputs per thread
//       fed by 128-bit shared loads, next K tile prefetched into registers while the current one
//       is multiplied (the tiling of implicit_gemm.cuh).
//   v2  conv2d_gemm_v2_<BM>x<BN> in conv2d_gemm.cu: the block-tile GEMM core of gemm_core.cuh,
//       shared with the backward-data pass; planned per shape in gpuconv/functional/conv_gemm.py.
//
// conv2d_forward_v1
//   out[n][co][oh][ow] = act(bias[co] + sum over ci, i, j of
//                            w[co][ci][i][j] * x[n][ci][oh*stride_h - pad_top + i*dil_h][ow*stride_w - pad_left + j*dil_w])
//   with zeros outside the input, act = ReLU when relu != 0 (NaN propagates), identity otherwise.
//   Layout: x (batch, c_in, height, width) NCHW; w (c_out, c_in, kernel_h, kernel_w) OIHW, i.e. a
//   c_out x K row-major matrix with K = c_in*kernel_h*kernel_w; bias (c_out); out (batch, c_out,
//   out_h, out_w) NCHW. float32, C-contiguous. Padding is given as top/left offsets plus the output
//   size, so asymmetric padding (PyTorch's 'same' with an even kernel) needs nothing special.
//   GEMM view: M = c_out, N = batch*out_h*out_w, K. The B tile (K x N) is gathered straight from x
//   (no im2col buffer): each thread owns one output pixel column of the tile, decoded once.
//   Launch: grid (ceil(batch*out_h*out_w / 64), ceil(c_out / 64)), block 256, no dynamic shared
//   memory (8.3 KB static).
//   Limits: batch*out_h*out_w and c_out*K below 2^31 - 64 (int, with a tile of headroom for the
//   unmasked tile indices); offsets into x and out are 64-bit; gridDim.y <= 65535, so
//   c_out <= 4194240.

#include "implicit_gemm.cuh"

__device__ __forceinline__ float load_weight(const float* __restrict__ w, int m, int k, int c_out, int patch)
{
    return (m < c_out && k < patch) ? __ldg(w + (long long)m * patch + k) : 0.0f;
}

// Rows k .. k + ALONG_N_LOADS - 1 of this thread's B column. x_image points at the column's image
// and (ih0, iw0) is its window's top-left corner.
__device__ __forceinline__ void gather_input_rows(float (&rows)[ALONG_N_LOADS], const float* __restrict__ x_image,
                                                  bool column_ok, int k, int patch, int taps, int kernel_h,
                                                  int kernel_w, int ih0, int iw0, int dil_h, int dil_w, int height,
                                                  int width)
{
    KernelTap tap(k, taps, kernel_w);
#pragma unroll
    for (int r = 0; r < ALONG_N_LOADS; ++r) {
        const int ih = ih0 + tap.i * dil_h;
        const int iw = iw0 + tap.j * dil_w;
        // One unsigned compare per axis tests both "above/left of the input" and "past its end".
        const bool inside = column_ok && k + r < patch && (unsigned)ih < (unsigned)height && (unsigned)iw < (unsigned)width;
        rows[r] = inside ? __ldg(x_image + ((long long)tap.channel * height + ih) * width + iw) : 0.0f;
        tap.next(kernel_h, kernel_w);
    }
}

extern "C" __global__ void __launch_bounds__(256)
conv2d_forward_v1(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                  float* __restrict__ out, int batch, int c_in, int height, int width, int c_out, int kernel_h,
                  int kernel_w, int stride_h, int stride_w, int pad_top, int pad_left, int dil_h, int dil_w,
                  int out_h, int out_w, int relu)
{
    __shared__ float4 a_tile[TILE_K][PADDED_PITCH / 4];
    __shared__ float4 b_tile[TILE_K][TILE_N / 4];

    const TileThread t;
    const int taps = kernel_h * kernel_w;
    const int patch = c_in * taps;
    const int plane = out_h * out_w;
    const int columns = batch * plane;

    // A (w) is loaded along K, where w is contiguous; B (x) along the output pixels, where x is.
    const int column = t.n0 + t.along_n_column;
    const bool column_ok = column < columns;
    int ih0 = 0, iw0 = 0;
    const float* x_image = x;
    if (column_ok) {
        const Pixel at = pixel_of(column, plane, out_w);
        ih0 = at.h * stride_h - pad_top;
        iw0 = at.w * stride_w - pad_left;
        x_image = x + (long long)at.image * c_in * height * width;
    }

    float a_next[ALONG_K_LOADS], b_next[ALONG_N_LOADS];
    const auto load = [&](int k0) {
#pragma unroll
        for (int r = 0; r < ALONG_K_LOADS; ++r)
            a_next[r] = load_weight(w, t.m0 + t.along_k_column + ALONG_K_STRIDE * r, k0 + t.along_k_row, c_out, patch);
        gather_input_rows(b_next, x_image, column_ok, k0 + t.along_n_row, patch, taps, kernel_h, kernel_w, ih0, iw0,
                          dil_h, dil_w, height, width);
    };
    const auto store = [&] {
        store_along_k(a_tile, a_next, t.along_k_row, t.along_k_column);
        store_along_n(b_tile, b_next, t.along_n_row, t.along_n_column);
    };
    float acc[MICRO][MICRO];
    gemm_k_loop(acc, a_tile, b_tile, t, 0, patch, load, store);

    store_nchw(out, acc, t, c_out, columns, plane, [&](int m, float sum) {
        const float value = sum + __ldg(bias + m);
        // Not fmaxf(value, 0): it returns 0 for a NaN, where the NumPy path and relu_forward_v1
        // (as PyTorch) propagate it, so a diverging layer would look finite only when fused.
        return relu && value < 0.0f ? 0.0f : value;
    });
}

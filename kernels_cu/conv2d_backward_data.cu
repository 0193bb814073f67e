// conv2d_backward_data.cu: gradient of conv2d with respect to its input (torch.nn.grad.conv2d_input).
//
// Versions:
//   v1  conv2d_backward_data_v1: implicit GEMM, 64x64 block tile, K step 16, 4x4 outputs per
//       thread fed by 128-bit shared loads, next K tile prefetched into registers while the
//       current one is multiplied (the tiling of implicit_gemm.cuh).
//   v2  conv2d_gemm_v2_<BM>x<BN> in conv2d_gemm.cu, shared with the forward pass: one launch per
//       output phase of the stride (the input pixels with one (y + pad) mod stride), each meeting
//       only the kernel taps that land on it; planned in gpuconv/functional/conv_gemm.py.
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
//   Limits: batch*height*width and c_out*c_in*kernel_h*kernel_w below 2^31 - 64 (int, with a tile
//   of headroom for the unmasked tile indices); offsets into grad_out and grad_x are 64-bit;
//   gridDim.y <= 65535, so c_in <= 4194240. With stride s > 1 only
//   about 1/s^2 of the K terms are non-zero, and they are still multiplied: the cost is that of
//   the stride-1 problem.

#include "implicit_gemm.cuh"

// Column k of the A tile, rows ci + ALONG_K_STRIDE * r: A[ci][k] is element (co, ci, tap) of the
// OIHW weight, k = co*taps + tap, decoded once for the ALONG_K_LOADS rows.
__device__ __forceinline__ void load_weight_rows(float (&rows)[ALONG_K_LOADS], const float* __restrict__ w, int ci,
                                                 int k, int c_in, int taps, int depth)
{
    const int co = k / taps;
    const float* tap_weights = w + (long long)co * c_in * taps + (k - co * taps);
#pragma unroll
    for (int r = 0; r < ALONG_K_LOADS; ++r) {
        const int row = ci + ALONG_K_STRIDE * r;
        rows[r] = (row < c_in && k < depth) ? __ldg(tap_weights + (long long)row * taps) : 0.0f;
    }
}

// Rows k .. k + ALONG_N_LOADS - 1 of this thread's B column: grad_out at the output pixel whose
// tap (i, j) covers the column's input pixel, zero where none does. grad_image points at the
// column's image; (y_pad, x_pad) is its pixel in padded coordinates.
__device__ __forceinline__ void gather_grad_rows(float (&rows)[ALONG_N_LOADS], const float* __restrict__ grad_image,
                                                 bool column_ok, int k, int depth, int taps, int kernel_h,
                                                 int kernel_w, int y_pad, int x_pad, int stride_h, int stride_w,
                                                 int dil_h, int dil_w, int out_h, int out_w)
{
    KernelTap tap(k, taps, kernel_w);
#pragma unroll
    for (int r = 0; r < ALONG_N_LOADS; ++r) {
        const int th = y_pad - tap.i * dil_h;
        const int tw = x_pad - tap.j * dil_w;
        // oh and ow only count where th, tw >= 0: there truncating division is floor division.
        // Stride 1, the common case, skips the division (~20 instructions each) on a uniform branch.
        const int oh = stride_h == 1 ? th : th / stride_h;
        const int ow = stride_w == 1 ? tw : tw / stride_w;
        const bool hit = column_ok && k + r < depth && th >= 0 && tw >= 0 && oh * stride_h == th &&
                         ow * stride_w == tw && oh < out_h && ow < out_w;
        rows[r] = hit ? __ldg(grad_image + ((long long)tap.channel * out_h + oh) * out_w + ow) : 0.0f;
        tap.next(kernel_h, kernel_w);
    }
}

// At least 3 blocks per SM (<= 80 registers): with the plain bound ptxas gave sm_80 64 registers
// and spilled 8 bytes, which check-kernels refuses in a convolution kernel.
extern "C" __global__ void __launch_bounds__(256, 3)
conv2d_backward_data_v1(const float* __restrict__ w, const float* __restrict__ grad_out,
                        float* __restrict__ grad_x, int batch, int c_in, int height, int width, int c_out,
                        int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_top, int pad_left,
                        int dil_h, int dil_w, int out_h, int out_w)
{
    __shared__ float4 a_tile[TILE_K][PADDED_PITCH / 4];
    __shared__ float4 b_tile[TILE_K][TILE_N / 4];

    const TileThread t;
    const int taps = kernel_h * kernel_w;
    const int depth = c_out * taps;
    const int plane = height * width;
    const int columns = batch * plane;

    // A (w) is loaded along K, contiguous within one output channel's taps; B (grad_out) along
    // the input pixels.
    const int column = t.n0 + t.along_n_column;
    const bool column_ok = column < columns;
    int y_pad = 0, x_pad = 0;
    const float* grad_image = grad_out;
    if (column_ok) {
        const Pixel at = pixel_of(column, plane, width);
        y_pad = at.h + pad_top;
        x_pad = at.w + pad_left;
        grad_image = grad_out + (long long)at.image * c_out * out_h * out_w;
    }

    float a_next[ALONG_K_LOADS], b_next[ALONG_N_LOADS];
    const auto load = [&](int k0) {
        load_weight_rows(a_next, w, t.m0 + t.along_k_column, k0 + t.along_k_row, c_in, taps, depth);
        gather_grad_rows(b_next, grad_image, column_ok, k0 + t.along_n_row, depth, taps, kernel_h, kernel_w, y_pad,
                         x_pad, stride_h, stride_w, dil_h, dil_w, out_h, out_w);
    };
    const auto store = [&] {
        store_along_k(a_tile, a_next, t.along_k_row, t.along_k_column);
        store_along_n(b_tile, b_next, t.along_n_row, t.along_n_column);
    };
    float acc[MICRO][MICRO];
    gemm_k_loop(acc, a_tile, b_tile, t, 0, depth, load, store);

    store_nchw(grad_x, acc, t, c_in, columns, plane, [](int, float sum) { return sum; });
}

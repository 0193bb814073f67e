// conv2d_gemm.cu: the v2 implicit-GEMM convolution kernel, shared by the forward pass
// (conv2d_forward v2) and the backward-data pass (conv2d_backward_data v2: one launch per output
// phase of the stride). See conv_tiles.cuh for the lattice formulation and gemm_core.cuh for the
// tiling.
//
// conv2d_gemm_v2_<BM>x<BN>
//   dst[n][m][dst_origin_h + dst_step_h*q][dst_origin_w + dst_step_w*r] =
//       act(bias[m] + sum over channel c < channels, tap t < n_taps of
//           a[m][c*n_taps + t] * src[n][c][src_origin_h + src_step_h*q + dh[t]][src_origin_w + src_step_w*r + dw[t]])
//   for every lattice pixel (n, q, r), n < batch, q < lattice_h, r < lattice_w, rows m < rows;
//   zeros outside src; bias only when has_bias, act = ReLU when relu (NaN propagates).
//   with the taps the grid t = a*taps_w + b: dh[t] = tap_h0 + a*tap_h_step, dw[t] = tap_w0 +
//   b*tap_w_step, n_taps = taps_h*taps_w.
//   Layout: a (rows, a_pitch) row-major, a_pitch >= channels*n_taps a multiple of 4, zeros past
//   channels*n_taps, 16-byte aligned (read with 128-bit loads; conv2d_weight_rows_v2 makes one);
//   src (batch, channels, src_h, src_w) NCHW; bias (rows); dst (batch, rows, dst_h, dst_w) NCHW,
//   only the lattice pixels written. float32, C-contiguous.
//   Launch: grid (ceil(batch*lattice_h*lattice_w / BN), ceil(rows / BM)), block BM*BN/64
//   (256 for 128x128, 128 for 128x64 and 64x128, 64 for 32x128), no dynamic shared memory.
//   Limits: n_taps <= 256; batch*lattice_h*lattice_w, channels*n_taps, channels*src_h*src_w and
//   rows*dst_h*dst_w below 2^31 - 128; gridDim.y <= 65535.

#include "conv_tiles.cuh"

// At least two blocks of 256 threads (three of 128, six of 64) per SM: at most 128 (168)
// registers a thread.

extern "C" __global__ void __launch_bounds__(256, 2)
conv2d_gemm_v2_128x128(const float* __restrict__ a, const float* __restrict__ src, const float* __restrict__ bias,
                   float* __restrict__ dst, int rows, int channels, int n_taps, int taps_w, int tap_h0,
                   int tap_h_step, int tap_w0, int tap_w_step, int src_h, int src_w, int batch, int lattice_h,
                   int lattice_w, int src_step_h, int src_step_w, int src_origin_h, int src_origin_w, int dst_h,
                   int dst_w, int dst_step_h, int dst_step_w, int dst_origin_h, int dst_origin_w, int has_bias,
                   int relu, int a_pitch)
{
    __shared__ __align__(16) conv::Shared<128, 128> shared;
    conv::lattice_gemm<128, 128>(shared, a, src, bias, dst, rows, channels, n_taps,
                                 conv::TapGrid{taps_w, tap_h0, tap_h_step, tap_w0, tap_w_step}, src_h, src_w, batch,
                                 lattice_h, lattice_w, src_step_h, src_step_w, src_origin_h, src_origin_w, dst_h,
                                 dst_w, dst_step_h, dst_step_w, dst_origin_h, dst_origin_w, has_bias, relu, a_pitch);
}

extern "C" __global__ void __launch_bounds__(128, 3)
conv2d_gemm_v2_128x64(const float* __restrict__ a, const float* __restrict__ src, const float* __restrict__ bias,
                   float* __restrict__ dst, int rows, int channels, int n_taps, int taps_w, int tap_h0,
                   int tap_h_step, int tap_w0, int tap_w_step, int src_h, int src_w, int batch, int lattice_h,
                   int lattice_w, int src_step_h, int src_step_w, int src_origin_h, int src_origin_w, int dst_h,
                   int dst_w, int dst_step_h, int dst_step_w, int dst_origin_h, int dst_origin_w, int has_bias,
                   int relu, int a_pitch)
{
    __shared__ __align__(16) conv::Shared<128, 64> shared;
    conv::lattice_gemm<128, 64>(shared, a, src, bias, dst, rows, channels, n_taps,
                                 conv::TapGrid{taps_w, tap_h0, tap_h_step, tap_w0, tap_w_step}, src_h, src_w, batch,
                                 lattice_h, lattice_w, src_step_h, src_step_w, src_origin_h, src_origin_w, dst_h,
                                 dst_w, dst_step_h, dst_step_w, dst_origin_h, dst_origin_w, has_bias, relu, a_pitch);
}

extern "C" __global__ void __launch_bounds__(128, 3)
conv2d_gemm_v2_64x128(const float* __restrict__ a, const float* __restrict__ src, const float* __restrict__ bias,
                   float* __restrict__ dst, int rows, int channels, int n_taps, int taps_w, int tap_h0,
                   int tap_h_step, int tap_w0, int tap_w_step, int src_h, int src_w, int batch, int lattice_h,
                   int lattice_w, int src_step_h, int src_step_w, int src_origin_h, int src_origin_w, int dst_h,
                   int dst_w, int dst_step_h, int dst_step_w, int dst_origin_h, int dst_origin_w, int has_bias,
                   int relu, int a_pitch)
{
    __shared__ __align__(16) conv::Shared<64, 128> shared;
    conv::lattice_gemm<64, 128>(shared, a, src, bias, dst, rows, channels, n_taps,
                                 conv::TapGrid{taps_w, tap_h0, tap_h_step, tap_w0, tap_w_step}, src_h, src_w, batch,
                                 lattice_h, lattice_w, src_step_h, src_step_w, src_origin_h, src_origin_w, dst_h,
                                 dst_w, dst_step_h, dst_step_w, dst_origin_h, dst_origin_w, has_bias, relu, a_pitch);
}

extern "C" __global__ void __launch_bounds__(64, 6)
conv2d_gemm_v2_32x128(const float* __restrict__ a, const float* __restrict__ src, const float* __restrict__ bias,
                   float* __restrict__ dst, int rows, int channels, int n_taps, int taps_w, int tap_h0,
                   int tap_h_step, int tap_w0, int tap_w_step, int src_h, int src_w, int batch, int lattice_h,
                   int lattice_w, int src_step_h, int src_step_w, int src_origin_h, int src_origin_w, int dst_h,
                   int dst_w, int dst_step_h, int dst_step_w, int dst_origin_h, int dst_origin_w, int has_bias,
                   int relu, int a_pitch)
{
    __shared__ __align__(16) conv::Shared<32, 128> shared;
    conv::lattice_gemm<32, 128>(shared, a, src, bias, dst, rows, channels, n_taps,
                                 conv::TapGrid{taps_w, tap_h0, tap_h_step, tap_w0, tap_w_step}, src_h, src_w, batch,
                                 lattice_h, lattice_w, src_step_h, src_step_w, src_origin_h, src_origin_w, dst_h,
                                 dst_w, dst_step_h, dst_step_w, dst_origin_h, dst_origin_w, has_bias, relu, a_pitch);
}

extern "C" __global__ void __launch_bounds__(256)
conv2d_weight_rows_v2(const float* __restrict__ w, float* __restrict__ out, int c_out, int c_in, int kernel_h,
                      int kernel_w, int taps_h, int taps_w, int tap_i0, int tap_i_step, int tap_j0, int tap_j_step,
                      int transpose, int pitch)
{
    const int n_taps = taps_h * taps_w;
    const int rows = transpose ? c_in : c_out;
    const int depth = (transpose ? c_out : c_in) * n_taps;
    const long long size = (long long)rows * pitch;
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < size;
         index += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(index / pitch), c = (int)(index - (long long)r * pitch);
        float value = 0.0f;
        if (c < depth) {
            const int q = c / n_taps, t = c - q * n_taps;
            const int a = t / taps_w, b = t - a * taps_w;
            const int co = transpose ? q : r, ci = transpose ? r : q;
            const int i = tap_i0 + a * tap_i_step, j = tap_j0 + b * tap_j_step;
            value = __ldg(w + (((long long)co * c_in + ci) * kernel_h + i) * kernel_w + j);
        }
        out[index] = value;
    }
}

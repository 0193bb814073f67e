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
//   Layout: a (rows, a_pitch) row-major, a_pitch >= channels*n_taps; for the 128-row tiles
//   (VECTOR_A below) a multiple of 4 with zeros past channels*n_taps, 16-byte aligned (read with
//   128-bit loads; conv2d_weight_rows_v2 makes one), for the others any such pitch (the OIHW
//   weight itself); src (batch, channels, src_h, src_w) NCHW; bias (rows); dst (batch, rows,
//   dst_h, dst_w) NCHW, only the lattice pixels written. float32, C-contiguous.
//   Launch: grid (ceil(batch*lattice_h*lattice_w / BN), ceil(rows / BM)), block BM*BN/64
//   (256 for 128x128, 128 for 128x64 and 64x128, 64 for 32x128), no dynamic shared memory.
//   Limits: n_taps <= 256; batch*lattice_h*lattice_w, channels*n_taps, channels*src_h*src_w and
//   rows*dst_h*dst_w below 2^31 - 128; gridDim.y <= 65535.
//
// conv2d_gemm_v2_<BM>x<BN>_transposed_weight, BM x BN = 64x128 and 32x128, and
// conv2d_gemm_narrow_v2_transposed_weight (at most 4 rows)
//   The backward-data GEMM above with A (parameter a) the OIHW weight w (channels, rows, kernel_h, kernel_w)
//   read in place, A[m][c*n_taps + t] = w[c][m][tap_i0 + a*tap_i_step][tap_j0 + b*tap_j_step]
//   for t = a*taps_w + b (the kernel taps of one stride phase): no re-laid copy (32-bit loads,
//   conv::TransposedWeightA). The last six arguments replace a_pitch; the rest as above.
//   Layout: w float32 C-contiguous at any 4-byte alignment. Launch and limits as above, with
//   channels*rows*kernel_h*kernel_w below 2^31 - 128. Only the small tiles: in place, 128x128
//   would spill and 128x64 lose 4 points of FFMA share (see benchmarks/NOTES.md, issue 9).
//
// conv2d_relu_max_pool2x2_v2_<BM>x<BN>
//   out[n][m][i][j] = max over (dy, dx) in {0, 1}^2 with (q, r) = (2i - pad_h + dy, 2j - pad_w + dx)
//   inside the conv_h x conv_w convolution output of relu(bias[m] + the forward sum above at
//   lattice pixel (n, q, r)), indices[n][m][i][j] = q*conv_w + r of the first maximum in
//   row-major window order (a NaN wins): max_pool2d(relu(conv2d(...)), 2, 2, pad, ceil_mode),
//   the convolution output never stored (see conv_pool_epilogue.cuh). The forward taps and
//   lattice as above (src_step = stride, src_origin = -padding); out, indices (batch, rows,
//   pool_h, pool_w) NCHW, float32 and int32; a as above.
//   Launch: grid (ceil(4*batch*pool_h*pool_w / BN), ceil(rows / BM)), block as above.
//   Limits: as above with 4*batch*pool_h*pool_w for the lattice; pad_h, pad_w <= 1.

#include "conv_pool_epilogue.cuh"

// At least two blocks of 256 threads (three of 128, six of 64) per SM: at most 128 (168)
// registers a thread.
// How each tile reads A (RowMajorA): 128-bit loads of a re-laid copy for the large tiles, 32-bit
// loads of the weights as they are for the small ones (see benchmarks/NOTES.md, issue 9).
constexpr bool VECTOR_A_128x128 = true;
constexpr bool VECTOR_A_128x64 = true;
constexpr bool VECTOR_A_64x128 = false;
constexpr bool VECTOR_A_32x128 = false;

// The tiles of a kernel family differ only in their tile and launch bounds: each family's parameter
// list is one macro (kernel_source.parse_signatures reads it as the compilers do) and its body
// another, so every entry point below is its name, launch bounds and tile.
#define CONV2D_GEMM_V2_LATTICE_PARAMS const float* __restrict__ a, const float* __restrict__ src, const float* __restrict__ bias, \
    float* __restrict__ dst, int rows, int channels, int n_taps, int taps_w, int tap_h0, int tap_h_step, int tap_w0, \
    int tap_w_step, int src_h, int src_w, int batch, int lattice_h, int lattice_w, int src_step_h, int src_step_w, \
    int src_origin_h, int src_origin_w, int dst_h, int dst_w, int dst_step_h, int dst_step_w, int dst_origin_h, \
    int dst_origin_w, int has_bias, int relu
#define CONV2D_GEMM_V2_LATTICE_ARGS src, bias, dst, rows, channels, n_taps, conv::TapGrid{taps_w, tap_h0, tap_h_step, tap_w0, tap_w_step}, src_h, src_w, batch, lattice_h, \
        lattice_w, src_step_h, src_step_w, src_origin_h, src_origin_w, dst_h, dst_w, dst_step_h, dst_step_w, \
        dst_origin_h, dst_origin_w, has_bias, relu

// Weights row-major (forward: OIHW as [C_out][K]; backward-data: the re-laid copy), a_pitch floats a row.
#define CONV2D_GEMM_V2_PARAMS CONV2D_GEMM_V2_LATTICE_PARAMS, int a_pitch
#define CONV2D_GEMM_V2_BODY(BM, BN)                                                                        \
    {                                                                                                   \
        __shared__ __align__(16) conv::Shared<BM, BN> shared;                                           \
        conv::lattice_conv<BM, BN>(shared, conv::RowMajorSource<VECTOR_A_##BM##x##BN>{a, a_pitch},       \
                                   CONV2D_GEMM_V2_LATTICE_ARGS);                                        \
    }

extern "C" __global__ void __launch_bounds__(256, 2)
conv2d_gemm_v2_128x128(CONV2D_GEMM_V2_PARAMS)
CONV2D_GEMM_V2_BODY(128, 128)

extern "C" __global__ void __launch_bounds__(128, 3)
conv2d_gemm_v2_128x64(CONV2D_GEMM_V2_PARAMS)
CONV2D_GEMM_V2_BODY(128, 64)

extern "C" __global__ void __launch_bounds__(128, 3)
conv2d_gemm_v2_64x128(CONV2D_GEMM_V2_PARAMS)
CONV2D_GEMM_V2_BODY(64, 128)

extern "C" __global__ void __launch_bounds__(64, 6)
conv2d_gemm_v2_32x128(CONV2D_GEMM_V2_PARAMS)
CONV2D_GEMM_V2_BODY(32, 128)

// Backward-data reading the OIHW weight in place along C_out (TransposedWeightSource).
#define CONV2D_GEMM_V2_TRANSPOSED_WEIGHT_PARAMS CONV2D_GEMM_V2_LATTICE_PARAMS, int kernel_h, int kernel_w, \
    int tap_i0, int tap_i_step, int tap_j0, int tap_j_step
#define CONV2D_GEMM_V2_TRANSPOSED_WEIGHT_BODY(BM, BN)                                                      \
    {                                                                                                   \
        __shared__ __align__(16) conv::Shared<BM, BN> shared;                                           \
        const conv::TransposedWeightSource weight{                                                      \
            a, kernel_h, {{taps_w, tap_i0, tap_i_step, tap_j0, tap_j_step}, kernel_w}};                  \
        conv::lattice_conv<BM, BN>(shared, weight, CONV2D_GEMM_V2_LATTICE_ARGS);                        \
    }

extern "C" __global__ void __launch_bounds__(128, 3)
conv2d_gemm_v2_64x128_transposed_weight(CONV2D_GEMM_V2_TRANSPOSED_WEIGHT_PARAMS)
CONV2D_GEMM_V2_TRANSPOSED_WEIGHT_BODY(64, 128)

extern "C" __global__ void __launch_bounds__(64, 6)
conv2d_gemm_v2_32x128_transposed_weight(CONV2D_GEMM_V2_TRANSPOSED_WEIGHT_PARAMS)
CONV2D_GEMM_V2_TRANSPOSED_WEIGHT_BODY(32, 128)

#define CONV2D_RELU_MAX_POOL2X2_V2_PARAMS const float* __restrict__ a, const float* __restrict__ src, \
    const float* __restrict__ bias, float* __restrict__ out, int* __restrict__ indices, int rows, int channels, \
    int n_taps, int taps_w, int tap_h0, int tap_h_step, int tap_w0, int tap_w_step, int src_h, int src_w, int batch, \
    int conv_h, int conv_w, int step_h, int step_w, int origin_h, int origin_w, int pool_h, int pool_w, int pad_h, \
    int pad_w, int has_bias, int a_pitch
#define CONV2D_RELU_MAX_POOL2X2_V2_BODY(BM, BN)                                                            \
    {                                                                                                   \
        __shared__ __align__(16) conv::Shared<BM, BN> shared;                                           \
        conv::conv_relu_max_pool2x2<BM, BN, VECTOR_A_##BM##x##BN>(                                      \
            shared, a, src, bias, out, indices, rows, channels, n_taps,                                 \
            conv::TapGrid{taps_w, tap_h0, tap_h_step, tap_w0, tap_w_step}, src_h, src_w, batch, conv_h,  \
            conv_w, step_h, step_w, origin_h, origin_w, pool_h, pool_w, pad_h, pad_w, has_bias, a_pitch); \
    }

extern "C" __global__ void __launch_bounds__(256, 2)
conv2d_relu_max_pool2x2_v2_128x128(CONV2D_RELU_MAX_POOL2X2_V2_PARAMS)
CONV2D_RELU_MAX_POOL2X2_V2_BODY(128, 128)

extern "C" __global__ void __launch_bounds__(128, 3)
conv2d_relu_max_pool2x2_v2_128x64(CONV2D_RELU_MAX_POOL2X2_V2_PARAMS)
CONV2D_RELU_MAX_POOL2X2_V2_BODY(128, 64)

extern "C" __global__ void __launch_bounds__(128, 3)
conv2d_relu_max_pool2x2_v2_64x128(CONV2D_RELU_MAX_POOL2X2_V2_PARAMS)
CONV2D_RELU_MAX_POOL2X2_V2_BODY(64, 128)

extern "C" __global__ void __launch_bounds__(64, 6)
conv2d_relu_max_pool2x2_v2_32x128(CONV2D_RELU_MAX_POOL2X2_V2_PARAMS)
CONV2D_RELU_MAX_POOL2X2_V2_BODY(32, 128)

// Channels of A staged per pass: NARROW_STAGE k values, as many whole channels as fit.
constexpr int NARROW_STAGE = 1024;
constexpr int NARROW_THREADS = 256;

// The narrow kernels' body: at most 4 rows, one thread per lattice pixel, the rows' A values of
// as many whole channels as fit staged in shared memory per pass (read with a_source.element:
// outside the tap loop, so its divisions cost nothing there).
template <class ASource>
__device__ __forceinline__ void narrow_lattice_conv(const ASource& a_source, const float* __restrict__ src,
                                                    const float* __restrict__ bias, float* __restrict__ dst, int rows,
                                                    int channels, int n_taps, int taps_w, int tap_h0, int tap_h_step,
                                                    int tap_w0, int tap_w_step, int src_h, int src_w, int batch,
                                                    int lattice_h, int lattice_w, int src_step_h, int src_step_w,
                                                    int src_origin_h, int src_origin_w, int dst_h, int dst_w,
                                                    int dst_step_h, int dst_step_w, int dst_origin_h, int dst_origin_w,
                                                    int has_bias, int relu)
{
    __shared__ int4 tap_table[conv::MAX_TAPS];
    __shared__ float4 stage[NARROW_STAGE];
    conv::fill_tap_table(tap_table, conv::TapGrid{taps_w, tap_h0, tap_h_step, tap_w0, tap_w_step}, n_taps, src_w,
                         conv::NO_KERNEL_TAPS);

    const int columns = batch * lattice_h * lattice_w;
    const int n = blockIdx.x * NARROW_THREADS + threadIdx.x;
    int row0 = conv::OUTSIDE, col0 = conv::OUTSIDE, origin = 0;
    if (n < columns) {
        const conv::LatticePixel at = conv::lattice_pixel(n, lattice_h, lattice_w);
        row0 = src_origin_h + src_step_h * at.q;
        col0 = src_origin_w + src_step_w * at.r;
        origin = (at.image * channels * src_h + row0) * src_w + col0;
    }
    const int plane = src_h * src_w;
    const int stage_channels = max(1, NARROW_STAGE / n_taps);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int c0 = 0; c0 < channels; c0 += stage_channels) {
        const int c1 = min(channels, c0 + stage_channels);
        for (int k = threadIdx.x; k < (c1 - c0) * n_taps; k += NARROW_THREADS) {
            const int column = c0 * n_taps + k;
            float v[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) v[r] = r < rows ? a_source.element(r, column, rows, n_taps) : 0.0f;
            stage[k] = make_float4(v[0], v[1], v[2], v[3]);
        }
        __syncthreads();  // the stage (and, the first time, the tap table) is filled
        for (int c = c0; c < c1; ++c) {
            const int channel_offset = origin + c * plane;
            const float4* weights = stage + (c - c0) * n_taps;
            for (int t = 0; t < n_taps; ++t) {
                const int4 tap = tap_table[t];
                if (!conv::inside(row0 + tap.y, col0 + tap.z, src_h, src_w)) continue;
                const float g = __ldg(src + (channel_offset + tap.x));
                const float4 w = weights[t];
                acc[0] = fmaf(w.x, g, acc[0]);
                acc[1] = fmaf(w.y, g, acc[1]);
                acc[2] = fmaf(w.z, g, acc[2]);
                acc[3] = fmaf(w.w, g, acc[3]);
            }
        }
        __syncthreads();  // every thread is done with this stage before the next pass refills it
    }
    if (n >= columns) return;
    const conv::LatticePixel at = conv::lattice_pixel(n, lattice_h, lattice_w);  // not kept live through K
    const long long dst_plane = (long long)dst_h * dst_w;
    float* pixel = dst + (long long)at.image * rows * dst_plane + (long long)(dst_origin_h + dst_step_h * at.q) * dst_w +
                   (dst_origin_w + dst_step_w * at.r);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        if (r >= rows) break;
        float value = acc[r] + (has_bias ? __ldg(bias + r) : 0.0f);
        if (relu && value < 0.0f) value = 0.0f;  // not fmaxf: NaN propagates, as PyTorch's ReLU
        pixel[r * dst_plane] = value;
    }
}

// Four blocks per SM asked for explicitly: left to itself, the NVRTC 13.0 that torch pins picks
// 32 registers for sm_80 and spills 20 bytes in the tap loop; 13.5 picks 40 without spilling.
extern "C" __global__ void __launch_bounds__(256, 4)
conv2d_gemm_narrow_v2(const float* __restrict__ a, const float* __restrict__ src, const float* __restrict__ bias,
                      float* __restrict__ dst, int rows, int channels, int n_taps, int taps_w, int tap_h0,
                      int tap_h_step, int tap_w0, int tap_w_step, int src_h, int src_w, int batch, int lattice_h,
                      int lattice_w, int src_step_h, int src_step_w, int src_origin_h, int src_origin_w, int dst_h,
                      int dst_w, int dst_step_h, int dst_step_w, int dst_origin_h, int dst_origin_w, int has_bias,
                      int relu, int a_pitch)
{
    narrow_lattice_conv(conv::RowMajorSource<false>{a, a_pitch}, src, bias, dst, rows, channels, n_taps, taps_w, tap_h0,
                        tap_h_step, tap_w0, tap_w_step, src_h, src_w, batch, lattice_h, lattice_w, src_step_h,
                        src_step_w, src_origin_h, src_origin_w, dst_h, dst_w, dst_step_h, dst_step_w, dst_origin_h,
                        dst_origin_w, has_bias, relu);
}

extern "C" __global__ void __launch_bounds__(256, 4)
conv2d_gemm_narrow_v2_transposed_weight(const float* __restrict__ w, const float* __restrict__ src,
                                        const float* __restrict__ bias, float* __restrict__ dst, int rows,
                                        int channels, int n_taps, int taps_w, int tap_h0, int tap_h_step, int tap_w0,
                                        int tap_w_step, int src_h, int src_w, int batch, int lattice_h, int lattice_w,
                                        int src_step_h, int src_step_w, int src_origin_h, int src_origin_w, int dst_h,
                                        int dst_w, int dst_step_h, int dst_step_w, int dst_origin_h, int dst_origin_w,
                                        int has_bias, int relu, int kernel_h, int kernel_w, int tap_i0, int tap_i_step,
                                        int tap_j0, int tap_j_step)
{
    const conv::TransposedWeightSource weight{w, kernel_h, {{taps_w, tap_i0, tap_i_step, tap_j0, tap_j_step}, kernel_w}};
    narrow_lattice_conv(weight, src, bias, dst, rows, channels, n_taps, taps_w, tap_h0, tap_h_step, tap_w0, tap_w_step,
                        src_h, src_w, batch, lattice_h, lattice_w, src_step_h, src_step_w, src_origin_h, src_origin_w,
                        dst_h, dst_w, dst_step_h, dst_step_w, dst_origin_h, dst_origin_w, has_bias, relu);
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

// conv2d_tensorcore.cu: 2-D convolution forward, backward-data and backward-filter on the tensor
// cores, TF32 or BF16 operands with FP32 accumulate (gpuconv.precision; F.conv2d(...,
// precision='tf32'|'bf16')).
//
// Versions:
//   conv2d_forward_tc, conv2d_backward_data_tc, conv2d_backward_filter_tc: implicit GEMM, 64x64
//       block tile, K step 16, four warps of 32x32, operand tiles gathered with 4-byte cp.async
//       into two shared stages, mma.sync m16n8k8 TF32 or m16n8k16 BF16 (tensorcore_gemm.cuh).
//
// Common to all three: x (batch, c_in, height, width) NCHW, w (c_out, c_in, kernel_h, kernel_w)
// OIHW, dy / out (batch, c_out, out_h, out_w); float32, C-contiguous. precision 0 = TF32 (operands
// rounded by cvt.rna.tf32), 1 = BF16 (cvt.rn.bf16x2); the FP32 values are copied into shared
// memory and rounded as fragments are read. Padding is given as top/left offsets plus the output
// size, as in conv2d_forward.cu. Launch: block 128 threads, 1-D, 20 KB static shared memory, no
// dynamic; the grid is given per kernel below.
// Limits: every GEMM extent (M, N, K) and element count below 2^31 - 64 (int indices, a tile of
// headroom); element offsets are 64-bit; gridDim.y <= 65535 M tiles. sm_80 or newer.
//
// conv2d_forward_tc
//   out[n][co][oh][ow] = act(bias[co] + sum over ci, i, j of
//                            w[co][ci][i][j] * x[n][ci][oh*stride_h - pad_top + i*dil_h][ow*stride_w - pad_left + j*dil_w])
//   act = ReLU when relu != 0 (NaN propagates). GEMM: M = c_out, N = batch*out_h*out_w,
//   K = c_in*kernel_h*kernel_w; A = w (contiguous along K), B gathered from x.
//   Grid (ceil(N / 64), ceil(c_out / 64)).
// conv2d_backward_data_tc
//   dx[n][ci][h][w] = sum over co, i, j with oh = (h + pad_top - i*dil_h) / stride_h and
//                     ow = (w + pad_left - j*dil_w) / stride_w exact and inside dy of
//                     w[co][ci][i][j] * dy[n][co][oh][ow]
//   GEMM: M = c_in, N = batch*height*width, K = c_out*kernel_h*kernel_w. Every element of dx is
//   written. Grid (ceil(N / 64), ceil(c_in / 64)).
// conv2d_backward_filter_tc
//   dw[co][ci][i][j] += sum over n, oh, ow in this block's K range of
//                       dy[n][co][oh][ow] * x[n][ci][oh*stride_h - pad_top + i*dil_h][ow*stride_w - pad_left + j*dil_w]
//   GEMM: M = c_out, N = c_in*kernel_h*kernel_w, K = batch*out_h*out_w, split over gridDim.z
//   blocks of k_per_split (a multiple of 16) values of K each, whose partial sums are added with
//   float atomicAdd into dw, which must be zeroed first (so the last bits depend on the order).
//   Grid (ceil(N / 64), ceil(c_out / 64), ceil(K / k_per_split)).

#include "tensorcore_gemm.cuh"

extern "C" __global__ void __launch_bounds__(128)
conv2d_forward_tc(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                  float* __restrict__ out, int batch, int c_in, int height, int width, int c_out, int kernel_h,
                  int kernel_w, int stride_h, int stride_w, int pad_top, int pad_left, int dil_h, int dil_w,
                  int out_h, int out_w, int relu, int precision)
{
    __shared__ tc::Stage stages[2];
    const int m0 = blockIdx.y * tc::BM, n0 = blockIdx.x * tc::BN;
    const int taps = kernel_h * kernel_w;
    const int patch = c_in * taps;
    const int plane = out_h * out_w;
    const int columns = batch * plane;

    // B is loaded along its rows (the output pixels), so this thread's pixel is the same for
    // every K tile: decoded once.
    const int column = n0 + tc::load_slot<tc::ALONG_ROWS>(0).row;
    const bool column_ok = column < columns;
    int ih0 = 0, iw0 = 0;
    const float* x_image = x;
    if (column_ok) {
        const int image = column / plane, p = column - image * plane, oh = p / out_w;
        ih0 = oh * stride_h - pad_top;
        iw0 = (p - oh * out_w) * stride_w - pad_left;
        x_image = x + (long long)image * c_in * height * width;
    }
    tc::TapCursor tap(tc::load_slot<tc::ALONG_ROWS>(0).k, kernel_h, kernel_w);  // this thread's next B row

    const auto load = [&](tc::Stage& s, int k0) {
#pragma unroll
        for (int r = 0; r < tc::LOADS; ++r) {
            const tc::Slot at = tc::load_slot<tc::ALONG_K>(r);
            const int m = m0 + at.row, k = k0 + at.k;
            const bool inside = m < c_out && k < patch;
            tc::copy_element(&s.a[at.row][at.k], inside ? w + (long long)m * patch + k : w, inside);
        }
#pragma unroll
        for (int r = 0; r < tc::LOADS; ++r) {
            const tc::Slot at = tc::load_slot<tc::ALONG_ROWS>(r);
            const int ih = ih0 + tap.i * dil_h, iw = iw0 + tap.j * dil_w;
            // One unsigned compare per axis tests both "before the input" and "past its end".
            const bool inside = column_ok && k0 + at.k < patch && (unsigned)ih < (unsigned)height &&
                                (unsigned)iw < (unsigned)width;
            tc::copy_element(&s.b[at.row][at.k],
                             inside ? x_image + ((long long)tap.channel * height + ih) * width + iw : x, inside);
            tap.advance<tc::THREADS / tc::BM>(kernel_h, kernel_w);
        }
    };
    tc::Accumulators acc;
    tc::mma_k_loop(acc, stages, 0, patch, precision, load);

    tc::for_each_output(acc, m0, n0, [&](int m, int n, float sum) {
        if (m >= c_out || n >= columns) return;
        const int image = n / plane;
        const float value = sum + __ldg(bias + m);
        // Not fmaxf(value, 0), which turns NaN into 0: as conv2d_forward_v1 and F.relu.
        out[((long long)image * c_out + m) * plane + (n - image * plane)] = relu && value < 0.0f ? 0.0f : value;
    });
}

extern "C" __global__ void __launch_bounds__(128)
conv2d_backward_data_tc(const float* __restrict__ w, const float* __restrict__ dy, float* __restrict__ dx, int batch,
                        int c_in, int height, int width, int c_out, int kernel_h, int kernel_w, int stride_h,
                        int stride_w, int pad_top, int pad_left, int dil_h, int dil_w, int out_h, int out_w,
                        int precision)
{
    __shared__ tc::Stage stages[2];
    const int m0 = blockIdx.y * tc::BM, n0 = blockIdx.x * tc::BN;
    const int taps = kernel_h * kernel_w;
    const int depth = c_out * taps;
    const int plane = height * width;
    const int columns = batch * plane;

    // B (dy) is loaded along its rows, the input pixels: this thread's pixel is decoded once.
    const int column = n0 + tc::load_slot<tc::ALONG_ROWS>(0).row;
    const bool column_ok = column < columns;
    int h_pad = 0, w_pad = 0;
    const float* dy_image = dy;
    if (column_ok) {
        const int image = column / plane, p = column - image * plane, h = p / width;
        h_pad = h + pad_top;
        w_pad = p - h * width + pad_left;
        dy_image = dy + (long long)image * c_out * out_h * out_w;
    }
    tc::TapCursor tap(tc::load_slot<tc::ALONG_ROWS>(0).k, kernel_h, kernel_w);  // (co, i, j) of the next B row

    const auto load = [&](tc::Stage& s, int k0) {
        // Along K, this thread's k is the same for all its A elements: decoded once per tile.
        const int k = k0 + tc::load_slot<tc::ALONG_K>(0).k;
        const int co = k / taps;
        const long long k_offset = (long long)co * c_in * taps + (k - co * taps);
#pragma unroll
        for (int r = 0; r < tc::LOADS; ++r) {
            const tc::Slot at = tc::load_slot<tc::ALONG_K>(r);
            const int m = m0 + at.row;
            const bool inside = m < c_in && k < depth;
            tc::copy_element(&s.a[at.row][at.k], inside ? w + k_offset + (long long)m * taps : w, inside);
        }
#pragma unroll
        for (int r = 0; r < tc::LOADS; ++r) {
            const tc::Slot at = tc::load_slot<tc::ALONG_ROWS>(r);
            const int oh_strided = h_pad - tap.i * dil_h, ow_strided = w_pad - tap.j * dil_w;
            const int oh = oh_strided / stride_h, ow = ow_strided / stride_w;
            // Negative numerators fail the first test, so truncating division needs no care.
            const bool inside = column_ok && k0 + at.k < depth && oh_strided >= 0 && ow_strided >= 0 &&
                                oh * stride_h == oh_strided && ow * stride_w == ow_strided && oh < out_h && ow < out_w;
            tc::copy_element(&s.b[at.row][at.k],
                             inside ? dy_image + ((long long)tap.channel * out_h + oh) * out_w + ow : dy, inside);
            tap.advance<tc::THREADS / tc::BM>(kernel_h, kernel_w);
        }
    };
    tc::Accumulators acc;
    tc::mma_k_loop(acc, stages, 0, depth, precision, load);

    tc::for_each_output(acc, m0, n0, [&](int m, int n, float sum) {
        if (m >= c_in || n >= columns) return;
        const int image = n / plane;
        dx[((long long)image * c_in + m) * plane + (n - image * plane)] = sum;
    });
}

extern "C" __global__ void __launch_bounds__(128)
conv2d_backward_filter_tc(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dw,
                          int batch, int c_in, int height, int width, int c_out, int kernel_h, int kernel_w,
                          int stride_h, int stride_w, int pad_top, int pad_left, int dil_h, int dil_w, int out_h,
                          int out_w, int k_per_split, int precision)
{
    __shared__ tc::Stage stages[2];
    const int m0 = blockIdx.y * tc::BM, n0 = blockIdx.x * tc::BN;
    const int taps = kernel_h * kernel_w;
    const int patch = c_in * taps;
    const int plane = out_h * out_w;
    const int depth = batch * plane;
    const int k_begin = blockIdx.z * k_per_split;
    const int k_end = min(k_begin + k_per_split, depth);

    // Both operands are contiguous along K (the output pixels), so both are loaded along K: this
    // thread's k is the same for all its elements of a tile, and its B rows (filter taps n) the
    // same in every tile, decoded once here into the tap's offset within an image.
    int tap_h[tc::LOADS], tap_w[tc::LOADS], tap_offset[tc::LOADS];
    unsigned int rows_ok = 0;  // bit r: row r is a filter tap (n < patch)
#pragma unroll
    for (int r = 0; r < tc::LOADS; ++r) {
        const int n = n0 + tc::load_slot<tc::ALONG_K>(r).row;
        const int channel = n / taps, tap = n - channel * taps, i = tap / kernel_w;
        rows_ok |= (unsigned int)(n < patch) << r;
        tap_h[r] = i * dil_h - pad_top;
        tap_w[r] = (tap - i * kernel_w) * dil_w - pad_left;
        tap_offset[r] = n < patch ? (channel * height + tap_h[r]) * width + tap_w[r] : 0;  // no int overflow past the end
    }

    const auto load = [&](tc::Stage& s, int k0) {
        const int k = k0 + tc::load_slot<tc::ALONG_K>(0).k;
        const bool k_ok = k < k_end;
        const int image = k / plane, p = k - image * plane, oh = p / out_w, ow = p - oh * out_w;
        const long long dy_pixel = (long long)image * c_out * plane + p;
        const long long x_pixel = ((long long)image * c_in * height + oh * stride_h) * width + ow * stride_w;
#pragma unroll
        for (int r = 0; r < tc::LOADS; ++r) {
            const tc::Slot at = tc::load_slot<tc::ALONG_K>(r);
            const int m = m0 + at.row;
            const bool inside = m < c_out && k_ok;
            tc::copy_element(&s.a[at.row][at.k], inside ? dy + dy_pixel + (long long)m * plane : dy, inside);
        }
#pragma unroll
        for (int r = 0; r < tc::LOADS; ++r) {
            const tc::Slot at = tc::load_slot<tc::ALONG_K>(r);
            const int ih = oh * stride_h + tap_h[r], iw = ow * stride_w + tap_w[r];
            const bool inside = k_ok && (rows_ok >> r & 1u) && (unsigned)ih < (unsigned)height && (unsigned)iw < (unsigned)width;
            tc::copy_element(&s.b[at.row][at.k], inside ? x + x_pixel + tap_offset[r] : x, inside);
        }
    };
    tc::Accumulators acc;
    tc::mma_k_loop(acc, stages, k_begin, k_end, precision, load);

    tc::for_each_output(acc, m0, n0, [&](int m, int n, float sum) {
        if (m < c_out && n < patch) atomicAdd(dw + (long long)m * patch + n, sum);
    });
}

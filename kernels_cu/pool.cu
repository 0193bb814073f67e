// pool.cu -- 2-D max and average pooling, forward and backward.
//
// Versions: max_pool2d_forward_v1, max_pool2d_backward_v1, avg_pool2d_forward_v1,
// avg_pool2d_backward_v1.
//
// Common to every kernel: float32, NCHW, C-contiguous; `planes` = N * C. Window (oh, ow) covers
// rows oh * sh - ph ... oh * sh - ph + kh - 1 (columns likewise) of the input plane; the caller
// computes OH, OW with PyTorch's rule (ceil_mode may add a last window reaching past the padded
// input) and guarantees ph <= kh / 2, pw <= kw / 2, so every window overlaps the input.
// Launch shape: 1-D grid-stride loops, one thread per output element (forward) or per input
// element (backward); block (256), grid (any, e.g. min(ceil(total / 256), 65535)); no shared
// memory. Offsets are 64-bit (planes * H * W may pass 2^31); in-plane positions are 32-bit.
//
// max_pool2d_forward_v1(x, y, indices, ...): y = the window's maximum over input positions only
//   (padding never wins), indices = its flat in-plane position h * W + w (int32). Ties keep the
//   first maximum in row-major window order, as PyTorch's CPU kernel does; a NaN wins and
//   propagates, and the first NaN's position is kept (numpy.argmax's choice).
// max_pool2d_backward_v1(grad_y, indices, grad_x, ...): grad_x[h, w] = sum of grad_y over the
//   windows containing (h, w) whose index is h * W + w. A gather: each input element sums its own
//   windows in a fixed order, so the result is deterministic and needs no atomics.
// avg_pool2d_forward_v1(x, y, ..., count_include_pad): y = window sum / divisor, with PyTorch's
//   divisor: the window clipped to the padded input (count_include_pad) or to the input.
// avg_pool2d_backward_v1(grad_y, grad_x, ..., count_include_pad): grad_x[h, w] = sum over the
//   windows containing (h, w) of grad_y / divisor; a gather, as for max.
// Limits: H * W < 2^31 per plane; grid and block any 1-D shape.

struct PoolShape {
    int H, W, OH, OW, kh, kw, sh, sw, ph, pw;
};

// The output rows (or columns) whose windows contain input row `h`: [*first, *last).
__device__ __forceinline__ void windows_containing(int h, int k, int s, int p, int out_size,
                                                   int* first, int* last) {
    const int hp = h + p;  // row in padded coordinates
    *first = hp < k ? 0 : (hp - k) / s + 1;
    *last = min(hp / s + 1, out_size);
}

// PyTorch's average-pooling divisor for window (oh, ow).
__device__ __forceinline__ int avg_divisor(const PoolShape& q, int oh, int ow, bool count_include_pad) {
    int h0 = oh * q.sh - q.ph, w0 = ow * q.sw - q.pw;
    int h1 = min(h0 + q.kh, q.H + q.ph), w1 = min(w0 + q.kw, q.W + q.pw);
    if (count_include_pad) return (h1 - h0) * (w1 - w0);
    h0 = max(h0, 0);
    w0 = max(w0, 0);
    h1 = min(h1, q.H);
    w1 = min(w1, q.W);
    return (h1 - h0) * (w1 - w0);
}

extern "C" __global__ void max_pool2d_forward_v1(const float* __restrict__ x, float* __restrict__ y,
                                                 int* __restrict__ indices, long long planes, int H, int W,
                                                 int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw) {
    const long long total = planes * OH * OW;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += stride) {
        const int ow = (int)(o % OW);
        const int oh = (int)((o / OW) % OH);
        const float* plane = x + (o / ((long long)OH * OW)) * H * W;
        const int h0 = max(oh * sh - ph, 0), h1 = min(oh * sh - ph + kh, H);
        const int w0 = max(ow * sw - pw, 0), w1 = min(ow * sw - pw + kw, W);
        // Start from the first input position so an all -inf window still names a real pixel.
        float best = -__int_as_float(0x7f800000);
        int best_at = h0 * W + w0;
        for (int h = h0; h < h1; ++h) {
            for (int w = w0; w < w1; ++w) {
                const float v = plane[h * W + w];
                if (v > best || (v != v && best == best)) {
                    best = v;
                    best_at = h * W + w;
                }
            }
        }
        y[o] = best;
        indices[o] = best_at;
    }
}

extern "C" __global__ void max_pool2d_backward_v1(const float* __restrict__ grad_y, const int* __restrict__ indices,
                                                  float* __restrict__ grad_x, long long planes, int H, int W,
                                                  int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw) {
    const long long total = planes * H * W;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int w = (int)(i % W);
        const int h = (int)((i / W) % H);
        const long long plane_out = (i / ((long long)H * W)) * OH * OW;
        int oh0, oh1, ow0, ow1;
        windows_containing(h, kh, sh, ph, OH, &oh0, &oh1);
        windows_containing(w, kw, sw, pw, OW, &ow0, &ow1);
        const int here = h * W + w;
        float sum = 0.f;
        for (int oh = oh0; oh < oh1; ++oh) {
            for (int ow = ow0; ow < ow1; ++ow) {
                const long long o = plane_out + (long long)oh * OW + ow;
                if (indices[o] == here) sum += grad_y[o];
            }
        }
        grad_x[i] = sum;
    }
}

extern "C" __global__ void avg_pool2d_forward_v1(const float* __restrict__ x, float* __restrict__ y,
                                                 long long planes, int H, int W, int OH, int OW, int kh, int kw,
                                                 int sh, int sw, int ph, int pw, bool count_include_pad) {
    const PoolShape q = {H, W, OH, OW, kh, kw, sh, sw, ph, pw};
    const long long total = planes * OH * OW;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += stride) {
        const int ow = (int)(o % OW);
        const int oh = (int)((o / OW) % OH);
        const float* plane = x + (o / ((long long)OH * OW)) * H * W;
        const int h0 = max(oh * sh - ph, 0), h1 = min(oh * sh - ph + kh, H);
        const int w0 = max(ow * sw - pw, 0), w1 = min(ow * sw - pw + kw, W);
        float sum = 0.f;
        for (int h = h0; h < h1; ++h) {
            for (int w = w0; w < w1; ++w) sum += plane[h * W + w];
        }
        y[o] = sum / (float)avg_divisor(q, oh, ow, count_include_pad);
    }
}

extern "C" __global__ void avg_pool2d_backward_v1(const float* __restrict__ grad_y, float* __restrict__ grad_x,
                                                  long long planes, int H, int W, int OH, int OW, int kh, int kw,
                                                  int sh, int sw, int ph, int pw, bool count_include_pad) {
    const PoolShape q = {H, W, OH, OW, kh, kw, sh, sw, ph, pw};
    const long long total = planes * H * W;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int w = (int)(i % W);
        const int h = (int)((i / W) % H);
        const float* plane = grad_y + (i / ((long long)H * W)) * OH * OW;
        int oh0, oh1, ow0, ow1;
        windows_containing(h, kh, sh, ph, OH, &oh0, &oh1);
        windows_containing(w, kw, sw, pw, OW, &ow0, &ow1);
        float sum = 0.f;
        for (int oh = oh0; oh < oh1; ++oh) {
            for (int ow = ow0; ow < ow1; ++ow) {
                sum += plane[oh * OW + ow] / (float)avg_divisor(q, oh, ow, count_include_pad);
            }
        }
        grad_x[i] = sum;
    }
}

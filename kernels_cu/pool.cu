// pool.cu -- 2-D max and average pooling, forward and backward.
//
// Versions: max_pool2d_forward_v1, max_pool2d_backward_v1, avg_pool2d_forward_v1,
// avg_pool2d_backward_v1; max_pool2d_relu_backward_v1 (max-pool backward with the ReLU before it).
//
// Common to every kernel: float32, NCHW, C-contiguous; `planes` = N * C. Window (oh, ow) covers
// rows oh * sh - ph ... oh * sh - ph + kh - 1 (columns likewise) of the input plane; the caller
// computes OH, OW with PyTorch's rule (ceil_mode may add a last window reaching past the padded
// input) and guarantees ph <= kh / 2, pw <= kw / 2, so every window overlaps the input.
// Launch shape: 1-D grid-stride loops, one thread per output element (forward) or per input
// element (backward); block (256), grid (any, e.g. min(ceil(total / 256), 65535)); no shared
// memory. Offsets are 64-bit (planes * H * W may pass 2^31); in-plane positions are 32-bit, window
// coordinates before clipping to the input and window areas 64-bit (a window and its padding may
// cover more than 2^31 positions).
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
// max_pool2d_relu_backward_v1(grad_y, indices, y, grad_x, ...): the gradient w.r.t. x of
//   max_pool(relu(x)), in one pass: as max_pool2d_backward_v1, counting only windows with y > 0.
//   Exact: a window picks relu(x) at its argmax, so y > 0 there is relu(x) > 0 (NaN: neither),
//   and every window that routes a gradient to (h, w) picked (h, w).
// Limits: H * W < 2^31 per plane; grid and block any 1-D shape.

struct PoolShape {
    int H, W, OH, OW, kh, kw, sh, sw, ph, pw;
};

// Rows [h0, h1) and columns [w0, w1) of a plane.
struct Rect {
    int h0, h1, w0, w1;
    __device__ __forceinline__ int area() const { return (h1 - h0) * (w1 - w0); }
};

// A window before clipping, in 64 bits: with its padding it may reach past 2^31 (a 46342 x 46342
// window has more than 2^31 positions), though its part inside the input never does.
struct Span {
    long long h0, h1, w0, w1;
    __device__ __forceinline__ long long area() const { return (h1 - h0) * (w1 - w0); }
};

// Window (oh, ow) in input coordinates, before any clipping.
__device__ __forceinline__ Span window_at(const PoolShape& q, int oh, int ow) {
    const long long h0 = (long long)oh * q.sh - q.ph, w0 = (long long)ow * q.sw - q.pw;
    return {h0, h0 + q.kh, w0, w0 + q.kw};
}

// The part of r inside the input: padding holds no pixels.
__device__ __forceinline__ Rect inside_input(const Span& r, const PoolShape& q) {
    return {(int)max(r.h0, 0ll), (int)min(r.h1, (long long)q.H), (int)max(r.w0, 0ll), (int)min(r.w1, (long long)q.W)};
}

// The output rows (or columns) whose windows contain input row `h`: [*first, *last).
__device__ __forceinline__ void windows_containing(int h, int k, int s, int p, int out_size,
                                                   int* first, int* last) {
    const long long hp = (long long)h + p;  // row in padded coordinates
    *first = hp < k ? 0 : (int)((hp - k) / s + 1);
    *last = (int)min(hp / s + 1, (long long)out_size);
}

// The windows containing input pixel (h, w): output rows [h0, h1), columns [w0, w1).
__device__ __forceinline__ Rect windows_containing(const PoolShape& q, int h, int w) {
    Rect r;
    windows_containing(h, q.kh, q.sh, q.ph, q.OH, &r.h0, &r.h1);
    windows_containing(w, q.kw, q.sw, q.pw, q.OW, &r.w0, &r.w1);
    return r;
}

// PyTorch's average-pooling divisor for window (oh, ow): the window clipped to the padded input
// (only a ceil_mode window reaches past it), and further to the input unless count_include_pad.
// Counted in 64 bits and only then rounded to float, as PyTorch's int64 divide_factor is.
__device__ __forceinline__ float avg_divisor(const PoolShape& q, int oh, int ow, bool count_include_pad) {
    Span r = window_at(q, oh, ow);
    r.h1 = min(r.h1, (long long)q.H + q.ph);
    r.w1 = min(r.w1, (long long)q.W + q.pw);
    return count_include_pad ? (float)r.area() : (float)inside_input(r, q).area();
}

// body(h, w) for every position of r in row-major order (max pooling's ties depend on it).
template <class Body>
__device__ __forceinline__ void for_each_in(Rect r, Body body) {
    for (int h = r.h0; h < r.h1; ++h) {
        for (int w = r.w0; w < r.w1; ++w) body(h, w);
    }
}

// body(i, plane, row, column) for every element i of a (planes, rows, columns) tensor, spread
// over the whole 1-D grid by a grid-stride loop.
template <class Body>
__device__ __forceinline__ void for_each_element(long long planes, int rows, int columns, Body body) {
    const long long total = planes * rows * columns;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int column = (int)(i % columns);
        const int row = (int)((i / columns) % rows);
        body(i, i / ((long long)rows * columns), row, column);
    }
}

// grad_x[i] = the sum of term(o, oh, ow, h, w) over the windows (oh, ow) containing input element
// i = (plane, h, w), o being the window's output offset: a gather in a fixed order, so
// deterministic and free of atomics.
template <class Term>
__device__ __forceinline__ void sum_over_windows(float* __restrict__ grad_x, long long planes, const PoolShape& q,
                                                 Term term) {
    for_each_element(planes, q.H, q.W, [&](long long i, long long plane, int h, int w) {
        const long long plane_out = plane * q.OH * q.OW;
        float sum = 0.f;
        for_each_in(windows_containing(q, h, w), [&](int oh, int ow) {
            sum += term(plane_out + (long long)oh * q.OW + ow, oh, ow, h, w);
        });
        grad_x[i] = sum;
    });
}

extern "C" __global__ void max_pool2d_forward_v1(const float* __restrict__ x, float* __restrict__ y,
                                                 int* __restrict__ indices, long long planes, int H, int W,
                                                 int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw) {
    const PoolShape q = {H, W, OH, OW, kh, kw, sh, sw, ph, pw};
    for_each_element(planes, OH, OW, [&](long long o, long long plane_index, int oh, int ow) {
        const float* plane = x + plane_index * H * W;
        const Rect window = inside_input(window_at(q, oh, ow), q);
        // Start from the first input position so an all -inf window still names a real pixel.
        float best = -__int_as_float(0x7f800000);
        int best_at = window.h0 * W + window.w0;
        for_each_in(window, [&](int h, int w) {
            const float v = plane[h * W + w];
            // Selects rather than a branch: ptxas then keeps the unrolled window loop in about a
            // third fewer registers.
            const bool wins = v > best || (v != v && best == best);
            best_at = wins ? h * W + w : best_at;
            best = wins ? v : best;
        });
        y[o] = best;
        indices[o] = best_at;
    });
}

extern "C" __global__ void max_pool2d_backward_v1(const float* __restrict__ grad_y, const int* __restrict__ indices,
                                                  float* __restrict__ grad_x, long long planes, int H, int W,
                                                  int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw) {
    const PoolShape q = {H, W, OH, OW, kh, kw, sh, sw, ph, pw};
    sum_over_windows(grad_x, planes, q, [&](long long o, int, int, int h, int w) {
        return indices[o] == h * W + w ? grad_y[o] : 0.f;
    });
}

extern "C" __global__ void avg_pool2d_forward_v1(const float* __restrict__ x, float* __restrict__ y,
                                                 long long planes, int H, int W, int OH, int OW, int kh, int kw,
                                                 int sh, int sw, int ph, int pw, bool count_include_pad) {
    const PoolShape q = {H, W, OH, OW, kh, kw, sh, sw, ph, pw};
    for_each_element(planes, OH, OW, [&](long long o, long long plane_index, int oh, int ow) {
        const float* plane = x + plane_index * H * W;
        float sum = 0.f;
        for_each_in(inside_input(window_at(q, oh, ow), q), [&](int h, int w) { sum += plane[h * W + w]; });
        y[o] = sum / avg_divisor(q, oh, ow, count_include_pad);
    });
}

extern "C" __global__ void avg_pool2d_backward_v1(const float* __restrict__ grad_y, float* __restrict__ grad_x,
                                                  long long planes, int H, int W, int OH, int OW, int kh, int kw,
                                                  int sh, int sw, int ph, int pw, bool count_include_pad) {
    const PoolShape q = {H, W, OH, OW, kh, kw, sh, sw, ph, pw};
    sum_over_windows(grad_x, planes, q, [&](long long o, int oh, int ow, int, int) {
        return grad_y[o] / avg_divisor(q, oh, ow, count_include_pad);
    });
}

extern "C" __global__ void max_pool2d_relu_backward_v1(const float* __restrict__ grad_y,
                                                       const int* __restrict__ indices, const float* __restrict__ y,
                                                       float* __restrict__ grad_x, long long planes, int H, int W,
                                                       int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw) {
    const PoolShape q = {H, W, OH, OW, kh, kw, sh, sw, ph, pw};
    sum_over_windows(grad_x, planes, q, [&](long long o, int, int, int h, int w) {
        return indices[o] == h * W + w && y[o] > 0.f ? grad_y[o] : 0.f;
    });
}

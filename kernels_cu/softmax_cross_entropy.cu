// Softmax cross-entropy over class scores: the per-sample loss, its gradient and (optionally) their
// sum or mean, in one launch.
//
// Versions: softmax_cross_entropy_v2 (v1 left the mean to a second device operation).
//
// softmax_cross_entropy_v2(logits, target, rows, classes, grad_scale, total_scale, reduce, loss,
//                          grad, total)
//   logits (N, C) float32 row-major, target (N,) int32, loss (N,), grad (N, C), total (1,).
//   A label outside [0, C) gives a NaN loss and a NaN gradient row, never an out-of-bounds read:
//   the Python side refuses such labels first unless the caller validated them once up front.
//   loss_n = log(sum_j exp(x_nj - m_n)) - (x_n,t - m_n) with m_n = max_j x_nj (max-subtracted, so
//   logits of any magnitude stay finite);
//   grad_nj = grad_scale * (softmax_nj - [j == t_n]), grad_scale = 1/N for a mean, 1 otherwise.
//   reduce: total[0] = total_scale * sum_n loss_n (1/N for a mean, 1 for a sum), summed in double
//   in a fixed order (each warp its rows in increasing order, then the warps' sums in warp
//   order): deterministic, no atomics. Without reduce, total is never written (any float array).
//   One warp per row: lanes stride over the classes, the max and the sum are reduced with
//   __shfl_xor_sync, exp is recomputed in the gradient pass rather than stored; a warp takes rows
//   warp, warp + warps of the grid, ...
//   Launch: block 256 (8 warps), no shared memory but 64 bytes static; grid ceil(N / 8) without
//   reduce, exactly 1 with it (the sum needs no second launch: a training batch is a few thousand
//   rows at most, 8 at a time).
//
// Limits: N < 2^31 and C < 2^31; the row offset n * C is 64-bit.

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu
#define WARPS 8

extern "C" __global__ void __launch_bounds__(256) softmax_cross_entropy_v2(
    const float* __restrict__ logits, const int* __restrict__ target, int rows, int classes,
    float grad_scale, double total_scale, bool reduce, float* __restrict__ loss, float* __restrict__ grad,
    float* __restrict__ total)
{
    __shared__ double warp_sums[WARPS];
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    double warp_sum = 0.0;  // lane 0's: its warp's losses
    // row is the same for the whole warp, so the full-mask shuffles always see 32 live lanes.
    for (int row = blockIdx.x * WARPS + warp; row < rows; row += gridDim.x * WARPS) {
        const float* x = logits + (long long)row * classes;
        float* dx = grad + (long long)row * classes;

        float m = -__int_as_float(0x7f800000);
        for (int j = lane; j < classes; j += WARP_SIZE) m = fmaxf(m, x[j]);
        for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2)
            m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, offset));

        float sum = 0.0f;
        for (int j = lane; j < classes; j += WARP_SIZE) sum += expf(x[j] - m);
        for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2)
            sum += __shfl_xor_sync(FULL_MASK, sum, offset);

        const int t = target[row];
        float row_loss;
        if (t < 0 || t >= classes) {
            const float nan = __int_as_float(0x7fffffff);
            for (int j = lane; j < classes; j += WARP_SIZE) dx[j] = nan;
            row_loss = nan;
        } else {
            const float inv_sum = 1.0f / sum;
            for (int j = lane; j < classes; j += WARP_SIZE) {
                const float p = expf(x[j] - m) * inv_sum;
                dx[j] = grad_scale * (j == t ? p - 1.0f : p);
            }
            row_loss = logf(sum) - (x[t] - m);
        }
        if (lane == 0) {
            loss[row] = row_loss;
            warp_sum += row_loss;
        }
    }
    if (!reduce) return;  // uniform over the launch
    if (lane == 0) warp_sums[warp] = warp_sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        double sum = 0.0;
        for (int w = 0; w < WARPS; ++w) sum += warp_sums[w];
        total[0] = (float)(sum * total_scale);
    }
}

// Softmax cross-entropy over class scores: the per-sample loss and its gradient in one pass.
//
// Versions: softmax_cross_entropy_v1.
//
// softmax_cross_entropy_v1(logits, target, rows, classes, grad_scale, loss, grad)
//   logits (N, C) float32 row-major, target (N,) int32, loss (N,), grad (N, C).
//   A label outside [0, C) gives a NaN loss and a NaN gradient row, never an out-of-bounds read:
//   the Python side refuses such labels first unless the caller validated them once up front.
//   loss_n = log(sum_j exp(x_nj - m_n)) - (x_n,t - m_n) with m_n = max_j x_nj (max-subtracted, so
//   logits of any magnitude stay finite);
//   grad_nj = grad_scale * (softmax_nj - [j == t_n]), grad_scale = 1/N for a mean, 1 otherwise.
//   One warp per row: lanes stride over the classes, the max and the sum are reduced with
//   __shfl_xor_sync, exp is recomputed in the gradient pass rather than stored.
//   Launch: block 256 (8 rows), grid ceil(N / 8), no shared memory. The mean over rows is left to
//   one device reduction of loss on the host side (deterministic, unlike an atomicAdd here).
//
// Limits: N < 2^31 and C < 2^31; the row offset n * C is 64-bit.

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

extern "C" __global__ void __launch_bounds__(256) softmax_cross_entropy_v1(
    const float* __restrict__ logits, const int* __restrict__ target, int rows, int classes,
    float grad_scale, float* __restrict__ loss, float* __restrict__ grad)
{
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    // row is the same for the whole warp, so a warp leaves together and the full-mask shuffles
    // below always see 32 live lanes.
    if (row >= rows) return;
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
    if (t < 0 || t >= classes) {
        const float nan = __int_as_float(0x7fffffff);
        for (int j = lane; j < classes; j += WARP_SIZE) dx[j] = nan;
        if (lane == 0) loss[row] = nan;
        return;
    }
    const float inv_sum = 1.0f / sum;
    for (int j = lane; j < classes; j += WARP_SIZE) {
        const float p = expf(x[j] - m) * inv_sum;
        dx[j] = grad_scale * (j == t ? p - 1.0f : p);
    }
    if (lane == 0) loss[row] = logf(sum) - (x[t] - m);
}

// Optimizer updates, in place, with the exact update rules of torch.optim.SGD and torch.optim.Adam.
//
// Versions: sgd_step_v2, adam_step_v2 (v1 took the learning rate and Adam's bias corrections as
// scalar arguments; v2 reads them from device memory, so that a captured CUDA graph, whose
// scalar arguments are frozen at capture, sees the values of each replay).
//
// Every kernel updates a flat float32 array of n elements (one parameter tensor, or all of an
// optimizer's parameters packed in one flat buffer), one thread per element. Launch: block 256,
// grid ceil(n / 256), no shared memory. Hyper-parameters are uniform across the launch, so the
// branches on them never diverge.
//
// sgd_step_v2(param, grad, momentum_buffer, n, lr, momentum, weight_decay, nesterov)
//   lr: device pointer to one float, the learning rate.
//   d = grad + weight_decay * param
//   if momentum != 0: buf = momentum * buf + d;  d = nesterov ? d + momentum * buf : buf
//   param -= lr * d
//   (dampening 0). momentum_buffer starts at zeros, which gives PyTorch's first step buf = d exactly;
//   it is never touched, and may be empty, when momentum == 0.
//
// adam_step_v2(param, grad, exp_avg, exp_avg_sq, n, beta1, beta2, eps, weight_decay, step)
//   step: device pointer to two floats, step_size and bias_correction2_sqrt.
//   g = grad + weight_decay * param            (L2 penalty, as torch.optim.Adam, not AdamW)
//   exp_avg    += (1 - beta1) * (g - exp_avg)   (torch's lerp)
//   exp_avg_sq  = beta2 * exp_avg_sq + (1 - beta2) * g^2
//   param      -= step_size * exp_avg / (sqrt(exp_avg_sq) / bias_correction2_sqrt + eps)
//   The host derives step_size = lr / (1 - beta1^step) and bias_correction2_sqrt =
//   sqrt(1 - beta2^step) from the step count in double precision, as PyTorch does (in float32,
//   1 - 0.999^step loses four significant digits at step 1), and rounds them to float.
//
// Limits: 64-bit element offsets (n may pass 2^31).

extern "C" __global__ void __launch_bounds__(256) sgd_step_v2(
    float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ momentum_buffer,
    long long n, const float* __restrict__ lr, float momentum, float weight_decay, bool nesterov)
{
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float p = param[i];
    float d = grad[i] + weight_decay * p;
    if (momentum != 0.0f) {
        const float buf = momentum * momentum_buffer[i] + d;
        momentum_buffer[i] = buf;
        d = nesterov ? d + momentum * buf : buf;
    }
    param[i] = p - lr[0] * d;
}

extern "C" __global__ void __launch_bounds__(256) adam_step_v2(
    float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ exp_avg,
    float* __restrict__ exp_avg_sq, long long n, float beta1, float beta2, float eps,
    float weight_decay, const float* __restrict__ step)
{
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float step_size = step[0], bias_correction2_sqrt = step[1];
    const float p = param[i];
    const float g = grad[i] + weight_decay * p;
    const float m = exp_avg[i] + (1.0f - beta1) * (g - exp_avg[i]);
    const float v = beta2 * exp_avg_sq[i] + (1.0f - beta2) * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = p - step_size * m / (sqrtf(v) / bias_correction2_sqrt + eps);
}

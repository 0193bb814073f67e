// Local response normalisation across channels, as torch.nn.functional.local_response_norm.
//
// Versions: lrn_forward_v1, lrn_backward_v1.
//
// Layout: input a, output b and their gradients are NCHW float32, viewed as (N, C, S) with S = H*W.
// Channel c's window is W(c) = [c - size/2, c + (size-1)/2] clipped to [0, C): PyTorch zero-pads
// size/2 channels before and (size-1)/2 after, so an even window leans towards the lower channels.
//   scale_c = k + alpha/size * sum_{j in W(c)} a_j^2,    b_c = a_c * scale_c^(-beta)
//
// lrn_forward_v1(input, output, total = N*C*S, channels, plane = S, size, k, alpha_over_size, beta)
//   One thread per output element. Launch: block 256, grid ceil(total / 256), no shared memory.
//   Each thread sums its own window (size loads; neighbouring threads read neighbouring pixels, so
//   every load is coalesced). The scale is not stored for the backward pass: recomputing it there
//   is cheaper than writing and re-reading a second activation-sized tensor.
//
// lrn_backward_v1(input, output, grad_output, grad_input, total, channels, plane, size, k,
//                 alpha_over_size, beta)
//   grad_a_i = g_i * scale_i^(-beta)
//              - 2 * beta * alpha/size * a_i * sum_{c : i in W(c)} g_c * b_c / scale_c,
//   where {c : i in W(c)} = [i - (size-1)/2, i + size/2] (the mirrored window). One thread per input
//   element, same launch shape as the forward. Each thread recomputes scale_c for the size channels
//   of its mirrored window, (size + 2) * size loads per element, almost all of them L1/L2 hits for
//   the small windows CNNs use (AlexNet: 5); one pass and no scratch tensor.
//
// Limits: 64-bit element offsets (total may pass 2^31); channels < 2^31; k + alpha/size * sum must be
// positive (it is for k > 0).

__device__ __forceinline__ float lrn_scale(const float* __restrict__ column, long long plane, int c,
                                           int channels, int size, float k, float alpha_over_size)
{
    // c + size / 2 may pass 2^31 for a huge size: the window is clipped to the channels in 64 bits.
    const int lo = max(c - size / 2, 0);
    const int hi = (int)min((long long)c + (size - 1) / 2, (long long)channels - 1);
    float sum = 0.0f;
    for (int j = lo; j <= hi; ++j) {
        const float v = column[j * plane];
        sum += v * v;
    }
    return k + alpha_over_size * sum;
}

extern "C" __global__ void __launch_bounds__(256) lrn_forward_v1(
    const float* __restrict__ input, float* __restrict__ output, long long total, int channels,
    long long plane, int size, float k, float alpha_over_size, float beta)
{
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int c = (int)((i / plane) % channels);
    const float* column = input + (i - c * plane);  // channel 0 of this (n, pixel)
    const float scale = lrn_scale(column, plane, c, channels, size, k, alpha_over_size);
    output[i] = input[i] * powf(scale, -beta);
}

extern "C" __global__ void __launch_bounds__(256) lrn_backward_v1(
    const float* __restrict__ input, const float* __restrict__ output,
    const float* __restrict__ grad_output, float* __restrict__ grad_input, long long total,
    int channels, long long plane, int size, float k, float alpha_over_size, float beta)
{
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int c = (int)((i / plane) % channels);
    const long long column = i - c * plane;
    const float* a = input + column;
    const float* b = output + column;
    const float* g = grad_output + column;

    const int lo = max(c - (size - 1) / 2, 0);
    const int hi = (int)min((long long)c + size / 2, (long long)channels - 1);
    float through_scales = 0.0f;
    for (int j = lo; j <= hi; ++j) {
        const long long at = j * plane;
        through_scales += g[at] * b[at] / lrn_scale(a, plane, j, channels, size, k, alpha_over_size);
    }
    const float scale = lrn_scale(a, plane, c, channels, size, k, alpha_over_size);
    grad_input[i] = grad_output[i] * powf(scale, -beta)
                    - 2.0f * beta * alpha_over_size * input[i] * through_scales;
}

// Bilinear resizing of NCHW images, as torch.nn.functional.interpolate(mode='bilinear').
//
// Versions: bilinear_resize_v1.
//
// bilinear_resize_v1(input, output, total, in_h, in_w, out_h, out_w, scale_h, scale_w, align_corners)
//   input (N, C, in_h, in_w), output (N, C, out_h, out_w), float32, total = N*C*out_h*out_w.
//   Source coordinate of output row y (PyTorch's area_pixel_compute_source_index):
//     align_corners: scale_h * y, with scale_h = (in_h - 1) / (out_h - 1) (0 when out_h == 1);
//     otherwise:     max(scale_h * (y + 0.5) - 0.5, 0), with scale_h = in_h / out_h;
//   the host computes the scales in float32 as PyTorch does. Rows h0 = floor(src) and
//   h1 = min(h0 + 1, in_h - 1) are blended with weights (1 - frac, frac); the same for columns; the
//   four products are summed in PyTorch's order.
//   One thread per output element. Launch: block 256, grid ceil(total / 256), no shared memory.
//   Neighbouring threads write neighbouring pixels of one row, so the stores are coalesced and the
//   gathered loads fall in one or two input rows.
//
// Limits: 64-bit element offsets (total may pass 2^31); each image side < 2^31.

__device__ __forceinline__ float source_index(float scale, int dst, bool align_corners)
{
    if (align_corners) return scale * dst;
    return fmaxf(scale * (dst + 0.5f) - 0.5f, 0.0f);
}

extern "C" __global__ void __launch_bounds__(256) bilinear_resize_v1(
    const float* __restrict__ input, float* __restrict__ output, long long total, int in_h, int in_w,
    int out_h, int out_w, float scale_h, float scale_w, bool align_corners)
{
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int x = (int)(i % out_w);
    const int y = (int)((i / out_w) % out_h);
    const long long image = i / ((long long)out_w * out_h);
    const float* plane = input + image * in_h * in_w;

    const float hs = source_index(scale_h, y, align_corners);
    const int h0 = (int)hs;
    const int h1 = h0 < in_h - 1 ? h0 + 1 : h0;
    const float h1_weight = hs - h0;
    const float h0_weight = 1.0f - h1_weight;

    const float ws = source_index(scale_w, x, align_corners);
    const int w0 = (int)ws;
    const int w1 = w0 < in_w - 1 ? w0 + 1 : w0;
    const float w1_weight = ws - w0;
    const float w0_weight = 1.0f - w1_weight;

    const float* row0 = plane + (long long)h0 * in_w;
    const float* row1 = plane + (long long)h1 * in_w;
    output[i] = h0_weight * (w0_weight * row0[w0] + w1_weight * row0[w1])
                + h1_weight * (w0_weight * row1[w0] + w1_weight * row1[w1]);
}

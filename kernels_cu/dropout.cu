// dropout.cu -- inverted dropout with a counter-based mask.
//
// Versions: dropout_v1; dropout_device_seed_v1 (the same, its seed in device memory).
//
// The keep-mask is a pure function of (seed, flat element index), so forward and backward need
// no stored mask and every device (this kernel on 'cuda' and 'emu', NumPy on 'cpu') draws the
// bit-identical mask from one seed:
//   bits(seed, i) = high 32 bits of mix64(mix64(seed) + (i + 1) * 0x9E3779B97F4A7C15)
// where mix64 is the SplitMix64 finaliser (all arithmetic modulo 2^64); element i is kept iff
// bits(seed, i) >= threshold, threshold = floor(p * 2^32), so P(keep) = 1 - threshold / 2^32.
//
// dropout_v1(x, y, n, seed, threshold, scale): y[i] = x[i] * (keep(i) ? scale : 0), with
//   scale = 1 / (1 - p) rounded to float32 by the caller: a multiplication, as PyTorch's, so a
//   dropped NaN or infinity becomes NaN rather than 0. The same kernel is dropout's backward
//   (grad_x = mask * scale * grad_y): the mask is re-derived from the seed.
// Layout: any, as a flat array of n float32 elements (the index is the C-order flat index).
// Launch shape: 1-D grid-stride loop; block (256), grid (any, e.g. ceil(n / 256) capped); no
//   shared memory.
// Limits: n < 2^63; y must not alias x.

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ unsigned int dropout_bits(unsigned long long key, unsigned long long index) {
    return (unsigned int)(mix64(key + (index + 1ull) * 0x9E3779B97F4A7C15ull) >> 32);
}

__device__ __forceinline__ void dropout_apply(const float* __restrict__ x, float* __restrict__ y, long long n,
                                              unsigned long long seed, unsigned int threshold, float scale) {
    const unsigned long long key = mix64(seed);
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = x[i] * (dropout_bits(key, (unsigned long long)i) >= threshold ? scale : 0.f);
    }
}

extern "C" __global__ void dropout_v1(const float* __restrict__ x, float* __restrict__ y, long long n,
                                      unsigned long long seed, unsigned int threshold, float scale) {
    dropout_apply(x, y, n, seed, threshold, scale);
}

// dropout_device_seed_v1(x, y, n, seed, threshold, scale): dropout_v1 with the seed read from
//   device memory (seed[0]), so that a captured CUDA graph draws the mask of each replay's seed.
extern "C" __global__ void dropout_device_seed_v1(const float* __restrict__ x, float* __restrict__ y, long long n,
                                                  const unsigned long long* __restrict__ seed,
                                                  unsigned int threshold, float scale) {
    dropout_apply(x, y, n, seed[0], threshold, scale);
}

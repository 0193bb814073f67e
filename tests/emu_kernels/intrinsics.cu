// Kernels that exercise the emulated device's intrinsics one by one (tests/test_emu_harness.py),
// each checked against a reference of CUDA's documented semantics.
//
// Versions: none (test fixtures, not library kernels).
//
// shuffles: per thread t of a 1-D block (a multiple of 32), out[4t..4t+3] = __shfl_sync(x, 5t),
//   __shfl_up_sync(x, delta), __shfl_down_sync(x, delta), __shfl_xor_sync(x, delta), all with
//   `width`; dout[t] = __shfl_xor_sync of the double d[t] with lane mask 1.
// block_votes: out[3t..3t+2] = __syncthreads_count(t % 3 == 0), __syncthreads_and(t < 1000),
//   __syncthreads_or(t == 5).
// atomics: every thread adds 1 to *fsum, 0.5 to *dsum, raises *imax to (7t) % 50, adds 2 to
//   *counter through an atomicCAS loop and exchanges t into *last.
// math: out[8t..8t+7] = expf(x), __expf(x), logf(x + 2), rsqrtf(x + 2), __saturatef(x),
//   __float2int_rn(10x), min(t, 3u), max(x, 0.25); x read as float4 (n a multiple of 4).
// dynamic_shared_forms: writes the dynamic arena through a file-scope float4 array and reads it
//   back through a function-scope unsigned char array: out[t] = t, unwritten[t] = the arena's
//   untouched float after blockDim.x float4s (shared_mem >= 32 * blockDim.x bytes).
// warp_deadlock: lane 0 waits at __syncthreads() while lanes 1..31 wait for it at a shuffle.
// warp_disagree: odd lanes reach __ballot_sync, even lanes __shfl_xor_sync, with one mask.
// stack_alignment: ok[t] = 1 when a 16-byte aligned local of a non-inlined function is aligned,
//   as the ABI promises on a fiber's stack too.

#define FULL_MASK 0xffffffffu

extern "C" __global__ void shuffles(const int* __restrict__ x, const double* __restrict__ d, int* __restrict__ out,
                                    double* __restrict__ dout, int width, int delta) {
    int t = threadIdx.x;
    int v = x[t];
    out[4 * t + 0] = __shfl_sync(FULL_MASK, v, 5 * t, width);
    out[4 * t + 1] = __shfl_up_sync(FULL_MASK, v, delta, width);
    out[4 * t + 2] = __shfl_down_sync(FULL_MASK, v, delta, width);
    out[4 * t + 3] = __shfl_xor_sync(FULL_MASK, v, delta, width);
    dout[t] = __shfl_xor_sync(FULL_MASK, d[t], 1, width);
}

extern "C" __global__ void block_votes(int* __restrict__ out) {
    int t = threadIdx.x;
    int count = __syncthreads_count(t % 3 == 0);
    int all = __syncthreads_and(t < 1000);
    int any = __syncthreads_or(t == 5);
    out[3 * t] = count;
    out[3 * t + 1] = all;
    out[3 * t + 2] = any;
}

extern "C" __global__ void atomics(float* __restrict__ fsum, double* __restrict__ dsum, int* __restrict__ imax,
                                   unsigned int* __restrict__ counter, int* __restrict__ last) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(fsum, 1.0f);
    atomicAdd(dsum, 0.5);
    atomicMax(imax, (7 * t) % 50);
    unsigned int seen = *counter, assumed;
    do {
        assumed = seen;
        seen = atomicCAS(counter, assumed, assumed + 2u);
    } while (seen != assumed);
    atomicExch(last, t);
}

extern "C" __global__ void math(const float* __restrict__ x, float* __restrict__ out) {
    int t = threadIdx.x;
    float4 quad = reinterpret_cast<const float4*>(x)[t / 4];
    float v = (t % 4 == 0) ? quad.x : (t % 4 == 1) ? quad.y : (t % 4 == 2) ? quad.z : quad.w;
    float* o = out + 8 * t;
    o[0] = expf(v);
    o[1] = __expf(v);
    o[2] = logf(v + 2.0f);
    o[3] = rsqrtf(v + 2.0f);
    o[4] = __saturatef(v);
    o[5] = (float)__float2int_rn(10.0f * v);
    o[6] = (float)min(t, 3u);
    o[7] = max(v, 0.25f);
}

extern __shared__ float4 file_scope_vec[];

extern "C" __global__ void dynamic_shared_forms(float* __restrict__ out, float* __restrict__ unwritten) {
    extern __shared__ __align__(16) unsigned char raw[];
    int t = threadIdx.x;
    file_scope_vec[t] = make_float4((float)t, (float)t, (float)t, (float)t);
    __syncthreads();
    const float* floats = reinterpret_cast<const float*>(raw);
    out[t] = floats[4 * t + 1];
    unwritten[t] = floats[4 * blockDim.x + t];
}

extern "C" __global__ void warp_deadlock(float* __restrict__ out) {
    int t = threadIdx.x;
    float v = (float)t;
    if (t == 0) __syncthreads();
    else v = __shfl_sync(FULL_MASK, v, 0);
    out[t] = v;
}

extern "C" __global__ void warp_disagree(int* __restrict__ out) {
    int t = threadIdx.x;
    if (t & 1) out[t] = (int)__ballot_sync(FULL_MASK, 1);
    else out[t] = __shfl_xor_sync(FULL_MASK, t, 1);
}

__device__ __noinline__ int local_is_aligned() {
    alignas(16) float local[4] = {0.0f, 1.0f, 2.0f, 3.0f};
    // Read back through a volatile so the compiler cannot assume the answer.
    volatile unsigned long long address = (unsigned long long)&local[0];
    return (address & 15ull) == 0 && local[3] == 3.0f;
}

extern "C" __global__ void stack_alignment(int* __restrict__ ok) {
    ok[threadIdx.x] = local_is_aligned();
}

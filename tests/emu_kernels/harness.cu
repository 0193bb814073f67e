// Kernels for the emulated device's own tests (tests/test_emu_harness.py): known-good kernels
// whose answers NumPy gives, and copies with one deliberate defect each, which the emulator must
// catch. Also compiled by the NVRTC compile gate's tests as a known-good file.
//
// Versions: none (test fixtures, not library kernels).
//
// matmul_tiled: C[M,N] = A[M,K] @ B[K,N], row-major; 16x16 shared tiles; grid (ceil(N/16),
//   ceil(M/16)), block (16, 16), no dynamic shared memory. Any M, N, K.
// matmul_tiled_no_second_sync: the same without the barrier that ends each tile step, so a
//   fast thread overwrites a tile its neighbours still read.
// block_sum: out[blockIdx.x] = sum of x[blockIdx.x * blockDim.x ...] (n elements in all); a
//   shared-memory tree; block a power of two <= 1024, dynamic shared blockDim.x floats.
// block_sum_no_sync: the same without the barrier inside the tree loop.
// warp_sum: *out += sum of x[0..n) by __shfl_down_sync within each warp, one atomicAdd per warp;
//   any 1-D grid and block (a multiple of 32).
// warp_ballot: for each warp w, masks[w] = __ballot_sync of x > 0, counts[w] = its popcount,
//   any_all[2w], any_all[2w+1] = __any_sync, __all_sync of the same predicate; n = threads.
// early_return_before_barrier: thread 3 returns before a __syncthreads().
// unwritten_shared_slot: block 0 writes s[1..64], later blocks s[0..63]; each thread t reads
//   s[t + 1] into y[blockIdx.x * blockDim.x + t]; so in a later block the last thread reads a
//   slot only an earlier block wrote. Block of 64 threads.
// uninitialised_accumulator: sums into a float that was never set to zero.
// out_of_bounds_write: y[i + offset] = x[i] for i < n: offset > 0 writes past y's end.
// scale: x[i] *= alpha, for scalar-type checks.
// barrier_loop: `iterations` barriers in a row, to time fiber switches.
// arrival_rank: rank[t] = the position at which thread t of the one block first ran.
// integer_divide: x[i] /= divisor (divisor 0 traps on the host).

#define TILE 16

// The tile loops of matmul_tiled and its defective copy, which differ only in the barrier that
// ends each step. The kernels declare the tiles: the emulator charges a __shared__ variable of a
// __device__ function to every kernel of the file.
template <bool SECOND_SYNC>
__device__ void matmul_tiles(float (&ta)[TILE][TILE], float (&tb)[TILE][TILE], const float* __restrict__ a,
                             const float* __restrict__ b, float* __restrict__ c, int m, int n, int k) {
    int row = blockIdx.y * TILE + threadIdx.y, col = blockIdx.x * TILE + threadIdx.x;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += TILE) {
        ta[threadIdx.y][threadIdx.x] = row < m && k0 + threadIdx.x < k ? a[row * k + k0 + threadIdx.x] : 0.0f;
        tb[threadIdx.y][threadIdx.x] = col < n && k0 + threadIdx.y < k ? b[(k0 + threadIdx.y) * n + col] : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < TILE; ++kk) acc += ta[threadIdx.y][kk] * tb[kk][threadIdx.x];
        if (SECOND_SYNC) __syncthreads();
    }
    if (row < m && col < n) c[row * n + col] = acc;
}

extern "C" __global__ void matmul_tiled(const float* __restrict__ a, const float* __restrict__ b,
                                        float* __restrict__ c, int m, int n, int k) {
    __shared__ float ta[TILE][TILE];
    __shared__ float tb[TILE][TILE];
    matmul_tiles<true>(ta, tb, a, b, c, m, n, k);
}

extern "C" __global__ void matmul_tiled_no_second_sync(const float* __restrict__ a, const float* __restrict__ b,
                                                       float* __restrict__ c, int m, int n, int k) {
    __shared__ float ta[TILE][TILE];
    __shared__ float tb[TILE][TILE];
    matmul_tiles<false>(ta, tb, a, b, c, m, n, k);
}

// The shared-memory tree of block_sum and its defective copy, which differ only in the barrier
// inside the tree loop.
template <bool TREE_SYNC>
__device__ void block_sum_tree(float* partial, const float* __restrict__ x, float* __restrict__ out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    partial[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        if (TREE_SYNC) __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

extern "C" __global__ void block_sum(const float* __restrict__ x, float* __restrict__ out, int n) {
    extern __shared__ float partial[];
    block_sum_tree<true>(partial, x, out, n);
}

extern "C" __global__ void block_sum_no_sync(const float* __restrict__ x, float* __restrict__ out, int n) {
    extern __shared__ __align__(16) float partial[];
    block_sum_tree<false>(partial, x, out, n);
}

extern "C" __global__ void warp_sum(const float* __restrict__ x, float* __restrict__ out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.0f;
#pragma unroll
    for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if ((threadIdx.x & (warpSize - 1)) == 0) atomicAdd(out, v);
}

extern "C" __global__ void warp_ballot(const float* __restrict__ x, unsigned int* __restrict__ masks,
                                       int* __restrict__ counts, int* __restrict__ any_all, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int positive = i < n && x[i] > 0.0f;
    unsigned int mask = __ballot_sync(0xffffffffu, positive);
    int any = __any_sync(0xffffffffu, positive), all = __all_sync(0xffffffffu, positive);
    int warp = i / warpSize;
    if ((i & (warpSize - 1)) == 0) {
        masks[warp] = mask;
        counts[warp] = __popc(mask);
        any_all[2 * warp] = any;
        any_all[2 * warp + 1] = all;
    }
}

extern "C" __global__ void early_return_before_barrier(float* __restrict__ y) {
    __shared__ float s[64];
    if (threadIdx.x == 3) return;
    s[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    y[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

extern "C" __global__ void unwritten_shared_slot(float* __restrict__ y) {
    __shared__ float s[65];
    s[threadIdx.x + (blockIdx.x == 0)] = (float)threadIdx.x;
    __syncthreads();
    y[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x + 1];
}

extern "C" __global__ void uninitialised_accumulator(const float* __restrict__ x, float* __restrict__ y, int k) {
    float acc;
    for (int j = 0; j < k; ++j) acc += x[threadIdx.x * k + j];
    y[threadIdx.x] = acc;
}

extern "C" __global__ void out_of_bounds_write(const float* __restrict__ x, float* __restrict__ y, int n, int offset) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i + offset] = x[i];
}

extern "C" __global__ void scale(float* __restrict__ x, float alpha, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= alpha;
}

extern "C" __global__ void barrier_loop(float* __restrict__ out, int iterations) {
    for (int i = 0; i < iterations; ++i) __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = (float)iterations;
}

extern "C" __global__ void arrival_rank(int* __restrict__ counter, int* __restrict__ rank) {
    rank[threadIdx.x] = atomicAdd(counter, 1);
}

extern "C" __global__ void integer_divide(int* __restrict__ x, int divisor) {
    x[threadIdx.x] /= divisor;
}

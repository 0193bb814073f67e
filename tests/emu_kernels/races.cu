// Kernels for the block-order and race-detector tests of the emulated device
// (tests/test_emu_harness.py): each but block_rank and block_sum_atomic_total holds one planted
// defect that a plain run in forward block order does not show.
//
// Versions: none (test fixtures, not library kernels).
//
// block_rank: rank[linear block index] = the position at which the block ran (thread 0 of each
//   block takes a ticket); any grid, any block.
// neighbour_block_read: block 0 writes data[t] = x[t] + 1; block 1 then reads data[t] into
//   out[t]: on a GPU nothing orders the two blocks. Grid (2), one block of n threads.
// float_atomic_sum: *sum += x[blockIdx.x] by one float atomicAdd per block: the rounding, hence
//   the answer, depends on the order the blocks run in. Grid (n), block (1).
// block_sum_atomic_total: a race-free two-level sum (shared tree per block, then one atomicAdd
//   of each block's total into *sum, an integer); any grid, block a power of two, dynamic
//   shared blockDim.x ints.
// shared_counter_plain_add: every thread of a block adds 1 to a shared int without an atomic
//   (a race within a warp and within the block). Block (64).
// warp_exchange: lane i reads lane (i ^ 1)'s value through shared memory with only
//   __syncwarp() between the write and the read: race-free within a warp.
// unsynchronised_flag: thread 0 sets a shared flag that thread 32 (another warp) reads after a
//   __syncwarp() only: the warp barrier does not order two warps.

extern "C" __global__ void block_rank(int* __restrict__ counter, int* __restrict__ rank) {
    if (threadIdx.x + threadIdx.y + threadIdx.z == 0)
        rank[blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)] = atomicAdd(counter, 1);
}

extern "C" __global__ void neighbour_block_read(const float* __restrict__ x, float* __restrict__ data,
                                                float* __restrict__ out) {
    if (blockIdx.x == 0) data[threadIdx.x] = x[threadIdx.x] + 1.0f;
    else out[threadIdx.x] = data[threadIdx.x];
}

extern "C" __global__ void float_atomic_sum(const float* __restrict__ x, float* __restrict__ sum) {
    atomicAdd(sum, x[blockIdx.x]);
}

extern "C" __global__ void block_sum_atomic_total(const int* __restrict__ x, int* __restrict__ sum, int n) {
    extern __shared__ int partial[];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    partial[threadIdx.x] = i < n ? x[i] : 0;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(sum, partial[0]);
}

extern "C" __global__ void shared_counter_plain_add(int* __restrict__ out) {
    __shared__ int count;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    count += 1;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = count;
}

extern "C" __global__ void warp_exchange(const int* __restrict__ x, int* __restrict__ out) {
    __shared__ int s[64];
    s[threadIdx.x] = x[threadIdx.x];
    __syncwarp();
    out[threadIdx.x] = s[threadIdx.x ^ 1];
}

extern "C" __global__ void unsynchronised_flag(int* __restrict__ out) {
    __shared__ int flag;
    if (threadIdx.x == 0) flag = 7;
    __syncwarp();
    if (threadIdx.x == 32) out[0] = flag;
}

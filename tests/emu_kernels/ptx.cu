// Kernels that exercise kernels_cu/ptx.cuh one instruction at a time (tests/test_ptx.py), each
// checked against the PTX ISA's definition computed in NumPy.
//
// Versions: none (test fixtures, not library kernels).
//
// cp_async_groups: block 64. Three commit groups: 4-byte .ca copies of src[0, 64) into buf[0, 64),
//   8-byte .ca copies of src[64, 192), 16-byte .cg copies of src[192, 448) reading src_bytes of
//   each 16 (the rest zero-filled). After cp.async.wait_group 2: early[2t] = buf[t] (its group has
//   landed) and early[2t + 1] = buf[64 + 2t] (its group has not: undefined, NaN on 'emu'). After
//   wait_group 0 and a barrier: out[i] = buf[i], i < 448.
// pipelined_sum: block 64, one block. out[t] = sum over tiles of x[tile * 64 + t], the tiles
//   streamed through two shared buffers with cp.async; wait_slack = 1 waits for one group too
//   few (the planted defect: a read of a copy before its wait).
// mma_tf32_tile: block 32 (one warp). d (16x8) = c + a (16x8 row-major) * b (8x8, b[k * 8 + n]),
//   operands rounded by cvt.rna.tf32, fragments loaded per the PTX ISA's layout. defect = 1 swaps
//   a[1] and a[2] (rows g+8 and columns t+4 mixed up), defect = 2 maps lanes to B's rows instead
//   of its columns: the planted wrong-fragment-index defects.
// mma_bf16_tile: as mma_tf32_tile for m16n8k16 BF16: a 16x16, b 16x8; defect = 1 swaps the
//   halves of a[0] (columns 2t and 2t+1).
// mma_some_lanes: block (threads, 1, 1); lanes below `active` execute an mma, the rest return.
// ldmatrix_all: block 32. m holds four 8x8 matrices of 16-bit values (one per int), row-major; stored
//   in shared memory with a row pitch of 16 elements and loaded with x1, x2, x4, then x1.trans,
//   x2.trans, x4.trans: out[(variant * 32 + lane) * 4 + i] = register i (unused registers 0).
// abandoned_copies: block 64, grid 2. Block 0's threads issue a copy of src[t] into buf[t] and
//   exit without waiting; block 1's write 7 into buf[t], wait for all their (no) copies and give
//   out[t] = buf[t]: 7, as nothing a thread left in flight carries over to another block.
// round_operands: tf32[i] = to_tf32(x[i]) bits; bf16[i] = pack_bf16x2(x[i], -x[i]).

#include "../../kernels_cu/ptx.cuh"

extern "C" __global__ void cp_async_groups(const float* __restrict__ src, float* __restrict__ out,
                                           float* __restrict__ early, int src_bytes)
{
    __shared__ __align__(16) float buf[448];
    const int t = threadIdx.x;
    cp_async_ca<4>(&buf[t], src + t);
    cp_async_commit();
    cp_async_ca<8>(&buf[64 + 2 * t], src + 64 + 2 * t);
    cp_async_commit();
    cp_async_cg16(&buf[192 + 4 * t], src + 192 + 4 * t, src_bytes);
    cp_async_commit();
    cp_async_wait<2>();
    early[2 * t] = buf[t];
    early[2 * t + 1] = buf[64 + 2 * t];
    cp_async_wait<0>();
    __syncthreads();
    for (int i = t; i < 448; i += 64) out[i] = buf[i];
}

extern "C" __global__ void pipelined_sum(const float* __restrict__ x, float* __restrict__ out, int tiles, int wait_slack)
{
    __shared__ float stage[2][64];
    const int t = threadIdx.x;
    float sum = 0.0f;
    cp_async_ca<4>(&stage[0][t], x + t);
    cp_async_commit();
    for (int tile = 0; tile < tiles; ++tile) {
        if (tile + 1 < tiles) cp_async_ca<4>(&stage[(tile + 1) % 2][t], x + (tile + 1) * 64 + t);
        cp_async_commit();
        if (wait_slack) cp_async_wait<2>();
        else cp_async_wait<1>();
        __syncthreads();
        sum += stage[tile % 2][63 - t];  // another thread's copy: needs the wait and the barrier
        __syncthreads();
    }
    out[t] = sum;
}

extern "C" __global__ void mma_tf32_tile(const float* __restrict__ a, const float* __restrict__ b,
                                         const float* __restrict__ c, float* __restrict__ d, int defect)
{
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    unsigned int af[4], bf[2];
    for (int i = 0; i < 4; ++i) af[i] = to_tf32(a[(g + 8 * (i % 2)) * 8 + t + 4 * (i / 2)]);
    if (defect == 1) {
        const unsigned int swap = af[1];
        af[1] = af[2];
        af[2] = swap;
    }
    for (int i = 0; i < 2; ++i)
        bf[i] = defect == 2 ? to_tf32(b[g * 8 + t + 4 * i]) : to_tf32(b[(t + 4 * i) * 8 + g]);
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    mma_tf32_m16n8k8(acc, af, bf);
    for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
}

extern "C" __global__ void mma_bf16_tile(const float* __restrict__ a, const float* __restrict__ b,
                                         const float* __restrict__ c, float* __restrict__ d, int defect)
{
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    unsigned int af[4], bf[2];
    for (int i = 0; i < 4; ++i) {
        const float* row = a + (g + 8 * (i % 2)) * 16 + 2 * t + 8 * (i / 2);
        af[i] = defect == 1 && i == 0 ? pack_bf16x2(row[1], row[0]) : pack_bf16x2(row[0], row[1]);
    }
    for (int i = 0; i < 2; ++i) bf[i] = pack_bf16x2(b[(2 * t + 8 * i) * 8 + g], b[(2 * t + 8 * i + 1) * 8 + g]);
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    mma_bf16_m16n8k16(acc, af, bf);
    for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
}

extern "C" __global__ void mma_some_lanes(float* __restrict__ d, int active)
{
    if ((int)threadIdx.x >= active) return;
    const unsigned int a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_tf32_m16n8k8(acc, a, b);
    d[threadIdx.x] = acc[0];
}

template <int COUNT, bool TRANS>
__device__ void ldmatrix_variant(const unsigned short (*s)[16], unsigned int* out, int variant)
{
    const int lane = threadIdx.x;
    unsigned int r[COUNT];
    ldmatrix<COUNT, TRANS>(r, s[lane % 32]);  // lane 8i + j: row j of matrix i
    for (int i = 0; i < 4; ++i) out[(variant * 32 + lane) * 4 + i] = i < COUNT ? r[i] : 0u;
}

extern "C" __global__ void ldmatrix_all(const unsigned int* __restrict__ m, unsigned int* __restrict__ out)
{
    __shared__ __align__(16) unsigned short s[32][16];
    const int lane = threadIdx.x;
    for (int col = 0; col < 16; ++col) s[lane][col] = col < 8 ? (unsigned short)m[lane * 8 + col] : (unsigned short)0xdead;
    __syncthreads();
    ldmatrix_variant<1, false>(s, out, 0);
    ldmatrix_variant<2, false>(s, out, 1);
    ldmatrix_variant<4, false>(s, out, 2);
    ldmatrix_variant<1, true>(s, out, 3);
    ldmatrix_variant<2, true>(s, out, 4);
    ldmatrix_variant<4, true>(s, out, 5);
}

extern "C" __global__ void abandoned_copies(const float* __restrict__ src, float* __restrict__ out)
{
    __shared__ float buf[64];
    const int t = threadIdx.x;
    if (blockIdx.x == 0) {
        cp_async_ca<4>(&buf[t], src + t);
        cp_async_commit();
        return;
    }
    buf[t] = 7.0f;
    cp_async_wait_all();
    __syncthreads();
    out[t] = buf[t];
}

extern "C" __global__ void round_operands(const float* __restrict__ x, unsigned int* __restrict__ tf32,
                                          unsigned int* __restrict__ bf16, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    tf32[i] = to_tf32(x[i]);
    bf16[i] = pack_bf16x2(x[i], -x[i]);
}

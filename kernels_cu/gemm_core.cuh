// gemm_core.cuh: the block-tile GEMM core of the v2 convolution kernels: C (M x N) += A (M x K)
// times B (K x N), with the tiles of A and B brought in by loaders and C written by an epilogue
// that the kernel supplies (conv_tiles.cuh holds the convolution ones), so that forward,
// backward-data and backward-filter are this one core with different loaders and epilogues.
//
// Tiling: a block computes a BM x BN tile of C, BK = 8 values of K at a time, with BM*BN/64
// threads; each thread owns 8x8 outputs as 2x2 sub-tiles of 4x4 half a block tile apart (rows
// 4*ty + r and 4*ty + r + BM/2, columns alike), so each K step reads its 8 A and 8 B values with
// four 128-bit shared loads and spends them on 64 FFMA. A warp covers 4 x 8 threads (ty x tx):
// its A reads touch 4 distinct float4 (broadcast), its B reads 8 consecutive ones: no bank
// conflicts. Tiles: 128x128 (256 threads), 128x64 / 64x128 (128 threads), 32x128 (64 threads,
// for narrow M).
// Shared memory: A and B double-buffered, k-major ([2][BK][BM + 4] and [2][BK][BN + 4]); the +4
// spreads stores whose lanes sit on several k-rows (A's transposing ones, backward-filter B's)
// over all banks while keeping rows 16-byte aligned. The next K tile is fetched into registers while the
// current one is multiplied, then stored into the other buffer: one barrier per K tile.
//
// Loader contract (A and B alike): fetch() reads this thread's share of the current K tile from
// global memory into registers (zeros outside the operands, and for every tile past the end of
// K, which the core fetches once); advance() moves to the next K tile;
// store(tile) writes the registers into a shared tile, [BK][BM + 4] for A, [BK][BN + 4] for B.

namespace gemm {

constexpr int BK = 8;
constexpr int WARP = 32;

template <int BM_, int BN_>
struct Tile {
    static constexpr int BM = BM_;
    static constexpr int BN = BN_;
    static constexpr int THREADS = BM * BN / 64;
    static constexpr int A_PITCH = BM + 4;
    static constexpr int B_PITCH = BN + 4;
    static constexpr int WARPS_N = BN / 64;  // a warp spans 8 threads = 32 columns of each half
    static_assert(BN % 64 == 0 && BM % 32 == 0, "a warp covers 4 x 8 threads of 4x4 in each half tile");
};

template <class T>
struct SharedTiles {
    float a[2][BK][T::A_PITCH];
    float b[2][BK][T::B_PITCH];
};

// This thread's 8x8 outputs: rows row(r), columns column(c) of the block tile, r, c < 8.
template <class T>
struct ThreadTile {
    int tx, ty;

    __device__ __forceinline__ ThreadTile()
    {
        const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
        tx = warp % T::WARPS_N * 8 + lane % 8;
        ty = warp / T::WARPS_N * 4 + lane / 8;
    }
    __device__ __forceinline__ int row(int r) const { return 4 * ty + r % 4 + r / 4 * (T::BM / 2); }
    __device__ __forceinline__ int column(int c) const { return 4 * tx + c % 4 + c / 4 * (T::BN / 2); }
};

template <class T>
__device__ __forceinline__ void multiply_tiles(float (&acc)[8][8], const float (&a)[BK][T::A_PITCH],
                                               const float (&b)[BK][T::B_PITCH], const ThreadTile<T>& t)
{
#pragma unroll
    for (int k = 0; k < BK; ++k) {
        const float4 a0 = *reinterpret_cast<const float4*>(&a[k][4 * t.ty]);
        const float4 a1 = *reinterpret_cast<const float4*>(&a[k][4 * t.ty + T::BM / 2]);
        const float4 b0 = *reinterpret_cast<const float4*>(&b[k][4 * t.tx]);
        const float4 b1 = *reinterpret_cast<const float4*>(&b[k][4 * t.tx + T::BN / 2]);
        const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int r = 0; r < 8; ++r)
#pragma unroll
            for (int c = 0; c < 8; ++c) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
    }
}

// Multiplies the K tile in buffer `current` while the next one travels from global memory through
// registers into the other buffer. Unconditionally, also after the last tile: the loaders read
// zeros past the end of K without touching memory, and nothing reads the buffer stored last; a
// branch would cost more issue slots than the masked loads. The other buffer was last read
// before the previous barrier, so it is free to overwrite; one barrier per K tile.
template <class T, class LoadA, class LoadB>
__device__ __forceinline__ void k_tile_step(float (&acc)[8][8], SharedTiles<T>& s, LoadA& a, LoadB& b,
                                            const ThreadTile<T>& t, int current)
{
    a.advance();
    b.advance();
    a.fetch();
    b.fetch();
    multiply_tiles(acc, s.a[current], s.b[current], t);
    a.store(s.a[current ^ 1]);
    b.store(s.b[current ^ 1]);
    __syncthreads();
}

// acc = this thread's 8x8 of the product over k_tiles K tiles. Every thread of the block must
// call it (it holds barriers); the caller has synchronised any shared state its loaders read.
template <int TRIP = 2, class T, class LoadA, class LoadB>
__device__ __forceinline__ void mainloop(float (&acc)[8][8], SharedTiles<T>& s, LoadA& a, LoadB& b, int k_tiles,
                                         const ThreadTile<T>& t)
{
    static_assert(TRIP % 2 == 0, "an even number of K tiles a trip keeps the buffer indices constant");
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[r][c] = 0.0f;
    if (k_tiles <= 0) return;

    a.fetch();
    b.fetch();
    a.store(s.a[0]);
    b.store(s.b[0]);
    __syncthreads();
    // TRIP K tiles per trip, an even number so that which buffer is read and which written is
    // known at compile time (shared addresses become constant offsets instead of per-tile
    // arithmetic); more tiles a trip spread what a trip re-derives over more of them.
    for (int tile = 0;; tile += TRIP) {
#pragma unroll
        for (int step = 0; step < TRIP; ++step) {
            k_tile_step(acc, s, a, b, t, step % 2);
            if (tile + step + 1 >= k_tiles) return;
        }
    }
}

}  // namespace gemm

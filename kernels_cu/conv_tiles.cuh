// conv_tiles.cuh: the loaders and epilogues that make gemm_core.cuh's block-tile GEMM a
// convolution, and the two kernel bodies built from them (the .cu files declare the shared
// memory and the extern "C" entry points, one per tile shape).
//
// Convolution as a GEMM over a "lattice" of pixels: pixel (q, r) of lattice image n sits at
// (origin_h + step_h*q, origin_w + step_w*r) of an NCHW tensor. A K index k = channel*n_taps + t
// names a channel and a tap t of a small table of (dh, dw) offsets, so the gathered value is
//     src[n][channel][origin_h + step_h*q + dh[t]][origin_w + step_w*r + dw[t]]   (0 outside).
//   forward:        src = x, lattice = the output pixels (step = stride, origin = -padding),
//                   taps (i*dil_h, j*dil_w), A = the weight (C_out x C_in*KH*KW), M = C_out;
//   backward-data:  one GEMM per output phase (stride_h x stride_w of them): src = grad_out,
//                   lattice = the input pixels of one phase, taps = only the kernel taps that
//                   land on that phase (as negative offsets), A = the weight re-laid as
//                   C_in x (C_out, phase taps), M = C_in: no zero tap is ever multiplied;
//   backward-filter: the roles swap: K runs over the output pixels, N over (channel, tap).
//
// The tap table sits in shared memory as int4 {dh*src_w + dw, dh, dw, 0}, filled once per
// block, so a gather is one 128-bit shared load per K row, then per element an add, two
// unsigned compares and a predicated load. (channel, tap) of each K row advances by BK with two
// adds and one compare; nothing in the K loop divides.
//
// Limits (the host checks them): n_taps <= MAX_TAPS; every operand's element count, and every
// K, below 2^31 - 128. Operand offsets are int, added to the base pointer only at the load (one
// IMAD.WIDE): 64-bit pointers per column would cost registers and two instructions a load. The
// int sums may leave the operand for a masked element (a column past N, a tap outside): such an
// address is formed, never loaded.

#include "gemm_core.cuh"

namespace conv {

using gemm::BK;

constexpr int MAX_TAPS = 256;
// A pixel origin that no tap offset brings inside a tensor: the column or row it marks (past N,
// past K) loads zeros through the ordinary bounds test, without a predicate of its own.
constexpr int OUTSIDE = -(1 << 30);

// The taps of a GEMM form a grid: tap t = a*taps_w + b is the offset (h0 + a*h_step, w0 +
// b*w_step), (i*dil_h, j*dil_w) in the forward pass, one phase's arithmetic progressions in the
// backward-data pass. Generated here from kernel arguments rather than read from a device table,
// so a launch needs no host-made array (nothing a CUDA graph capture would have to copy in).
struct TapGrid {
    int taps_w, h0, h_step, w0, w_step;

    __device__ __forceinline__ int2 offset(int t) const
    {
        const int a = t / taps_w;
        return make_int2(h0 + a * h_step, w0 + (t - a * taps_w) * w_step);
    }
};

__device__ __forceinline__ void fill_tap_table(int4 (&table)[MAX_TAPS], const TapGrid& grid, int n_taps, int src_w)
{
    for (int t = threadIdx.x; t < n_taps; t += blockDim.x) {
        const int2 d = grid.offset(t);
        table[t] = make_int4(d.x * src_w + d.y, d.x, d.y, 0);
    }
}

// A block's shared memory: the GEMM tiles, and a table for the B loader: the taps (forward,
// backward-data) or the block's BN columns (backward-filter: what its B loader needs of each
// column, looked up instead of held in 12 registers, which would push its K loop past its budget
// of 128; the forward loader's per-column registers cost less than 4 extra shared loads a tile).
template <int BM, int BN>
struct Shared {
    gemm::SharedTiles<gemm::Tile<BM, BN>> tiles;
    union {
        int4 taps[MAX_TAPS];
        int4 columns[BN];
    };
};

__device__ __forceinline__ bool inside(int h, int w, int height, int width)
{
    // One unsigned compare per axis tests both "before the start" and "past the end".
    return (unsigned)h < (unsigned)height && (unsigned)w < (unsigned)width;
}

// A row-major M x K operand contiguous along K (the weights), with rows `pitch` floats apart.
// Thread tid loads GROUPS runs of 4 consecutive k (k4 = tid % (BK/4) * 4) of rows
// (tid + THREADS*g) / (BK/4).
// VECTOR: each run with one 128-bit load: the host passes a 16-byte aligned operand whose pitch
// is a multiple of 4 and whose columns past K, up to the pitch, are zeros. Otherwise (an OIHW
// weight as it is, K % 4 != 0 or misaligned: LeNet's K = 25 and 150) four 32-bit loads, each
// masked at K = pitch: 3 more loads and their predicates per run and K tile, where the 128-bit
// path would need a re-laid copy of the weights (a launch per call, since the optimizer
// updates them in place).
// A row past M loads row M - 1 instead: it only feeds outputs the epilogue drops, and a predicate
// fewer keeps the K loop within its registers.
template <class T, bool VECTOR = true>
struct RowMajorA {
    static constexpr int GROUPS = T::BM * BK / 4 / T::THREADS;
    const float* a;
    int row[GROUPS];
    int k4, k, pitch;
    float4 v[GROUPS];

    __device__ __forceinline__ RowMajorA(const float* __restrict__ a_, int m0, int rows, int pitch_)
        : a(a_), k4(threadIdx.x % (BK / 4) * 4), k(threadIdx.x % (BK / 4) * 4), pitch(pitch_)
    {
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) row[g] = min(m0 + local_row(g), rows - 1) * pitch;
    }
    __device__ __forceinline__ static int local_row(int g) { return (threadIdx.x + T::THREADS * g) / (BK / 4); }

    __device__ __forceinline__ void fetch()
    {
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) {
            if (VECTOR) {
                v[g] = k < pitch ? __ldg(reinterpret_cast<const float4*>(a + (row[g] + k)))
                                 : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            } else {
                float e[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) e[j] = k + j < pitch ? __ldg(a + (row[g] + k + j)) : 0.0f;
                v[g] = make_float4(e[0], e[1], e[2], e[3]);
            }
        }
    }
    __device__ __forceinline__ void advance() { k += BK; }
    __device__ __forceinline__ void store(float (&tile)[BK][T::A_PITCH]) const
    {
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) {
            tile[k4][local_row(g)] = v[g].x;
            tile[k4 + 1][local_row(g)] = v[g].y;
            tile[k4 + 2][local_row(g)] = v[g].z;
            tile[k4 + 3][local_row(g)] = v[g].w;
        }
    }
};

// Pixel n of a lattice of lattice_h x lattice_w pixels per image.
struct LatticePixel {
    int image, q, r;
};

__device__ __forceinline__ LatticePixel lattice_pixel(int n, int lattice_h, int lattice_w)
{
    const int plane = lattice_h * lattice_w;
    const int image = n / plane;
    const int p = n - image * plane;
    const int q = p / lattice_w;
    return {image, q, p - q * lattice_w};
}

// Where the columns of the forward and backward-data GEMMs gather: column n is lattice pixel
// lattice_pixel(n): image `image`, at (row, col) of src before the tap offsets. locate() answers
// false for a column that gathers nothing (past N here; other column orders, such as the pooled
// one of conv_pool_epilogue.cuh, also for a pixel they skip).
struct LatticeColumns {
    int columns, lattice_h, lattice_w, step_h, step_w, origin_h, origin_w;

    __device__ __forceinline__ bool locate(int n, int& image, int& row, int& col) const
    {
        if (n >= columns) return false;
        const LatticePixel at = lattice_pixel(n, lattice_h, lattice_w);
        image = at.image;
        row = origin_h + step_h * at.q;
        col = origin_w + step_w * at.r;
        return true;
    }
};

// The B operand of the forward and backward-data GEMMs: rows k = (channel, tap), columns the
// pixels that `Columns` (LatticeColumns or another order) names. Thread tid owns 4 consecutive
// columns (tid % (BN/4) * 4, decoded once) and GROUPS rows (tid / (BN/4) + ROW_STEP*g), and
// stores each row's 4 values with one 128-bit store.
template <class T>
struct PixelColumnsB {
    static constexpr int GROUPS = BK * T::BN / 4 / T::THREADS;
    static constexpr int ROW_STEP = T::THREADS / (T::BN / 4);
    const float* src;
    const int4* taps;
    int column[4];  // offset of the column's pixel (before any tap) from src
    int row0[4], col0[4];
    int channel[GROUPS], tap[GROUPS];
    int col4, row;
    int channels, n_taps, plane, src_h, src_w, d_channel, d_tap;
    float4 v[GROUPS];

    template <class Columns>
    __device__ __forceinline__ PixelColumnsB(const float* __restrict__ src_, const int4* taps_, int n0,
                                             const Columns& columns, int channels_, int n_taps_, int src_h_,
                                             int src_w_)
        : src(src_), taps(taps_), col4(threadIdx.x % (T::BN / 4) * 4), row(threadIdx.x / (T::BN / 4)), channels(channels_),
          n_taps(n_taps_), plane(src_h_ * src_w_), src_h(src_h_), src_w(src_w_), d_channel(BK / n_taps_),
          d_tap(BK % n_taps_)
    {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int image;
            if (columns.locate(n0 + col4 + j, image, row0[j], col0[j])) {
                column[j] = (image * channels * src_h + row0[j]) * src_w + col0[j];
            } else {
                row0[j] = col0[j] = OUTSIDE;
                column[j] = 0;
            }
        }
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) {
            const int k = row + ROW_STEP * g;
            channel[g] = k / n_taps;
            tap[g] = k - channel[g] * n_taps;
        }
    }

    __device__ __forceinline__ void fetch()
    {
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) {
            const int4 t = taps[tap[g]];
            const bool k_ok = channel[g] < channels;
            const int offset = channel[g] * plane + t.x;
            float e[4];
#pragma unroll
            for (int j = 0; j < 4; ++j)
                e[j] = k_ok && inside(row0[j] + t.y, col0[j] + t.z, src_h, src_w) ? __ldg(src + (column[j] + offset)) : 0.0f;
            v[g] = make_float4(e[0], e[1], e[2], e[3]);
        }
    }
    __device__ __forceinline__ void advance()
    {
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) {
            tap[g] += d_tap;
            channel[g] += d_channel;
            if (tap[g] >= n_taps) {
                tap[g] -= n_taps;
                ++channel[g];
            }
        }
    }
    __device__ __forceinline__ void store(float (&tile)[BK][T::B_PITCH]) const
    {
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) *reinterpret_cast<float4*>(&tile[row + ROW_STEP * g][col4]) = v[g];
    }
};

// The K row of the backward-filter GEMM this thread loads, k = k_begin + tid % BK, as an output
// pixel (image, oh, ow), stepped by BK without dividing: BK = d_image*plane + d_h*out_w + d_w,
// with carries. Both backward-filter loaders read the same K row, so one walk serves both: the
// A loader reads it, the B loader steps it.
struct PixelWalk {
    int k, k_end, image, oh, ow;
    int out_h, out_w, d_image, d_h, d_w;

    __device__ __forceinline__ PixelWalk(int k_begin, int k_end_, int out_h_, int out_w_)
        : k(k_begin + threadIdx.x % BK), k_end(k_end_), out_h(out_h_), out_w(out_w_)
    {
        const int plane = out_h * out_w;
        image = k / plane;
        const int p = k - image * plane;
        oh = p / out_w;
        ow = p - oh * out_w;
        d_image = BK / plane;
        const int rest = BK - d_image * plane;
        d_h = rest / out_w;
        d_w = rest - d_h * out_w;
    }
    __device__ __forceinline__ bool valid() const { return k < k_end; }
    __device__ __forceinline__ void step()
    {
        k += BK;
        ow += d_w;
        const bool wrap_w = ow >= out_w;
        ow -= wrap_w ? out_w : 0;
        oh += d_h + wrap_w;
        const bool wrap_h = oh >= out_h;
        oh -= wrap_h ? out_h : 0;
        image += d_image + wrap_h;
    }
};

// The A operand of the backward-filter GEMM: grad_out as C_out x (output pixels). Thread tid
// loads its walk's K row for channels tid / BK + M_STEP*g; consecutive lanes read consecutive
// pixels (contiguous in memory), and their transposed stores hit 32 distinct banks.
template <class T>
struct PixelRowsA {
    static constexpr int GROUPS = T::BM * BK / T::THREADS;
    static constexpr int M_STEP = T::THREADS / BK;
    const float* grad;
    const PixelWalk& at;
    int channels, first_offset, rows_left;  // rows_left: rows of this thread's first one on
    float v[GROUPS];

    __device__ __forceinline__ PixelRowsA(const float* __restrict__ grad_, const PixelWalk& at_, int m0, int rows)
        : grad(grad_), at(at_), channels(rows), first_offset((m0 + threadIdx.x / BK) * at_.out_h * at_.out_w),
          rows_left(rows - m0 - threadIdx.x / BK)
    {
    }
    __device__ __forceinline__ void fetch()
    {
        const int plane = at.out_h * at.out_w;
        const int pixel = at.image * channels * plane + at.oh * at.out_w + at.ow + first_offset;
        const bool k_ok = at.valid();
#pragma unroll
        for (int g = 0; g < GROUPS; ++g)
            v[g] = k_ok && M_STEP * g < rows_left ? __ldg(grad + (pixel + M_STEP * g * plane)) : 0.0f;
    }
    __device__ __forceinline__ void advance() {}  // the B loader steps the shared walk
    __device__ __forceinline__ void store(float (&tile)[BK][T::A_PITCH]) const
    {
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) tile[threadIdx.x % BK][threadIdx.x / BK + M_STEP * g] = v[g];
    }
};

// Column n = channel*n_taps + t of a backward-filter block, as ChannelTapColumnsB reads it:
// {offset of (channel, tap t) from a window's origin, dh, dw, 0}; past N, a tap never inside.
template <int BN>
__device__ __forceinline__ void fill_channel_tap_columns(int4 (&table)[BN], const TapGrid& taps, int n0, int columns,
                                                         int n_taps, int height, int width)
{
    for (int c = threadIdx.x; c < BN; c += blockDim.x) {
        const int n = n0 + c;
        int4 entry = make_int4(0, OUTSIDE, OUTSIDE, 0);
        if (n < columns) {
            const int channel = n / n_taps, t = n - channel * n_taps;
            const int2 d = taps.offset(t);
            entry.y = d.x;
            entry.z = d.y;
            entry.x = channel * height * width + entry.y * width + entry.z;
        }
        table[c] = entry;
    }
}

// The B operand of the backward-filter GEMM: x gathered as (output pixels) x (channel, tap).
// Thread tid loads its walk's K row for GROUPS runs of 4 consecutive columns,
// tid / BK * 4 + COLUMN_STEP*g; the lanes of a warp cover 8 consecutive pixels of 4 runs, and
// B's padded pitch keeps their 128-bit stores on distinct banks.
template <class T>
struct ChannelTapColumnsB {
    static constexpr int GROUPS = BK * T::BN / 4 / T::THREADS;
    static constexpr int COLUMN_STEP = T::THREADS / BK * 4;
    const float* x;
    PixelWalk& at;
    const int4* columns;
    int channels, height, width, stride_h, stride_w, pad_top, pad_left;
    float4 v[GROUPS];

    __device__ __forceinline__ ChannelTapColumnsB(const float* __restrict__ x_, PixelWalk& at_, const int4* columns_,
                                                  int channels_, int height_, int width_, int stride_h_,
                                                  int stride_w_, int pad_top_, int pad_left_)
        : x(x_), at(at_), columns(columns_), channels(channels_), height(height_), width(width_),
          stride_h(stride_h_), stride_w(stride_w_), pad_top(pad_top_), pad_left(pad_left_)
    {
    }
    __device__ __forceinline__ static int column(int g) { return threadIdx.x / BK * 4 + COLUMN_STEP * g; }
    __device__ __forceinline__ void fetch()
    {
        const int ih0 = at.oh * stride_h - pad_top, iw0 = at.ow * stride_w - pad_left;
        const int window = (at.image * channels * height + ih0) * width + iw0;
        const bool k_ok = at.valid();
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) {
            float e[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int4 c = columns[column(g) + j];
                e[j] = k_ok && inside(ih0 + c.y, iw0 + c.z, height, width) ? __ldg(x + (window + c.x)) : 0.0f;
            }
            v[g] = make_float4(e[0], e[1], e[2], e[3]);
        }
    }
    __device__ __forceinline__ void advance() { at.step(); }
    __device__ __forceinline__ void store(float (&tile)[BK][T::B_PITCH]) const
    {
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) *reinterpret_cast<float4*>(&tile[threadIdx.x % BK][column(g)]) = v[g];
    }
};

// Epilogue of the forward and backward-data GEMMs: C[m][n] (+ bias[m], then ReLU) into row m
// (a channel) of an NCHW tensor at lattice pixel n. Each column is decoded once for its 8 rows.
template <class T>
struct StoreLattice {
    float* dst;
    int rows, columns, lattice_h, lattice_w, dst_h, dst_w, step_h, step_w, origin_h, origin_w;
    const float* bias;  // nullptr: none
    bool relu;

    __device__ __forceinline__ void operator()(const float (&acc)[8][8], const gemm::ThreadTile<T>& t, int m0,
                                               int n0) const
    {
        const long long dst_plane = (long long)dst_h * dst_w;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const int n = n0 + t.column(c);
            if (n >= columns) continue;
            const LatticePixel at = lattice_pixel(n, lattice_h, lattice_w);
            float* pixel = dst + (long long)at.image * rows * dst_plane + (long long)(origin_h + step_h * at.q) * dst_w +
                           (origin_w + step_w * at.r);
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                const int m = m0 + t.row(r);
                if (m >= rows) continue;
                float value = acc[r][c] + (bias ? __ldg(bias + m) : 0.0f);
                // Not fmaxf(value, 0): it turns a NaN into 0, where PyTorch's ReLU propagates it.
                if (relu && value < 0.0f) value = 0.0f;
                pixel[m * dst_plane] = value;
            }
        }
    }
};

// The forward / backward-data kernel body: A (rows x channels*n_taps, 128-bit loads when
// VECTOR_A, see RowMajorA) times B gathered from src at the pixels `columns` names, handed to
// `epilogue(acc, thread tile, m0, n0)`.
template <int BM, int BN, bool VECTOR_A, class Columns, class Epilogue>
__device__ __forceinline__ void lattice_gemm(Shared<BM, BN>& shared, const float* __restrict__ a, int a_pitch,
                                             int rows, const float* __restrict__ src, int channels, int n_taps,
                                             const TapGrid& taps, int src_h, int src_w, const Columns& columns,
                                             const Epilogue& epilogue)
{
    using T = gemm::Tile<BM, BN>;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int depth = channels * n_taps;
    fill_tap_table(shared.taps, taps, n_taps, src_w);
    __syncthreads();

    const gemm::ThreadTile<T> t;
    RowMajorA<T, VECTOR_A> a_loader(a, m0, rows, a_pitch);
    PixelColumnsB<T> b_loader(src, shared.taps, n0, columns, channels, n_taps, src_h, src_w);
    float acc[8][8];
    gemm::mainloop(acc, shared.tiles, a_loader, b_loader, (depth + BK - 1) / BK, t);
    epilogue(acc, t, m0, n0);
}

// conv2d_gemm_v2's body: the lattice GEMM stored by StoreLattice.
template <int BM, int BN, bool VECTOR_A>
__device__ __forceinline__ void lattice_conv(Shared<BM, BN>& shared, const float* __restrict__ a,
                                             const float* __restrict__ src, const float* __restrict__ bias,
                                             float* __restrict__ dst, int rows, int channels, int n_taps,
                                             const TapGrid& taps, int src_h, int src_w, int batch, int lattice_h,
                                             int lattice_w, int src_step_h, int src_step_w, int src_origin_h,
                                             int src_origin_w, int dst_h, int dst_w, int dst_step_h, int dst_step_w,
                                             int dst_origin_h, int dst_origin_w, int has_bias, int relu, int a_pitch)
{
    const int columns = batch * lattice_h * lattice_w;
    const LatticeColumns lattice{columns, lattice_h, lattice_w, src_step_h, src_step_w, src_origin_h, src_origin_w};
    const StoreLattice<gemm::Tile<BM, BN>> store{dst, rows, columns, lattice_h, lattice_w, dst_h, dst_w, dst_step_h,
                                                 dst_step_w, dst_origin_h, dst_origin_w, has_bias ? bias : nullptr,
                                                 relu != 0};
    lattice_gemm<BM, BN, VECTOR_A>(shared, a, a_pitch, rows, src, channels, n_taps, taps, src_h, src_w, lattice, store);
}

// The backward-filter kernel body: block z's partial sum over K indices [k_begin, k_end) of
// grad_w (rows x columns, OIHW) into partials[z], plain stores (the reduce kernel adds them).
template <int BM, int BN>
__device__ __forceinline__ void weight_gradient_gemm(Shared<BM, BN>& shared, const float* __restrict__ x,
                                                     const float* __restrict__ grad_out, const TapGrid& taps,
                                                     float* __restrict__ partials, int batch, int c_in, int height,
                                                     int width, int c_out, int n_taps, int stride_h, int stride_w,
                                                     int pad_top, int pad_left, int out_h, int out_w, int k_per_split)
{
    using T = gemm::Tile<BM, BN>;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int columns = c_in * n_taps;
    const int k_begin = blockIdx.z * k_per_split;
    // Not min(K, k_begin + k_per_split): that sum can pass 2^31 for the last split.
    const int k_end = k_begin + min(k_per_split, batch * out_h * out_w - k_begin);
    fill_channel_tap_columns(shared.columns, taps, n0, columns, n_taps, height, width);
    __syncthreads();

    const gemm::ThreadTile<T> t;
    PixelWalk walk(k_begin, k_end, out_h, out_w);
    PixelRowsA<T> a_loader(grad_out, walk, m0, c_out);
    ChannelTapColumnsB<T> b_loader(x, walk, shared.columns, c_in, height, width, stride_h, stride_w, pad_top, pad_left);
    float acc[8][8];
    gemm::mainloop(acc, shared.tiles, a_loader, b_loader, (k_end - k_begin + BK - 1) / BK, t);

    float* partial = partials + (long long)blockIdx.z * c_out * columns;
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        const int m = m0 + t.row(r);
        if (m >= c_out) continue;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const int n = n0 + t.column(c);
            if (n < columns) partial[(long long)m * columns + n] = acc[r][c];
        }
    }
}

}  // namespace conv

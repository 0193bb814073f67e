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
//   backward-filter: the roles swap: K runs over the output pixels, N over (tap, channel).
//
// The tap table sits in shared memory as int4 {dh*src_w + dw, dh, dw, kernel tap}, filled once per
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

// The kernel taps (i, j) behind a GEMM's taps, for an A loader that reads the OIHW weight as it
// is: tap t's offset in a kernel plane is i*kernel_w + j, (i, j) = grid.offset(t). The empty one
// (kernel_w 0) gives offset 0: A loaders that read a row-major A need none.
struct KernelTaps {
    TapGrid grid;
    int kernel_w;
};

constexpr KernelTaps NO_KERNEL_TAPS{{1, 0, 0, 0, 0}, 0};

// Entry t: {offset of tap t in src (dh*src_w + dw), dh, dw, offset of its kernel tap (KernelTaps)}.
__device__ __forceinline__ void fill_tap_table(int4 (&table)[MAX_TAPS], const TapGrid& grid, int n_taps, int src_w,
                                               const KernelTaps& kernel)
{
    for (int t = threadIdx.x; t < n_taps; t += blockDim.x) {
        const int2 d = grid.offset(t);
        const int2 ij = kernel.grid.offset(t);
        table[t] = make_int4(d.x * src_w + d.y, d.x, d.y, ij.x * kernel.kernel_w + ij.y);
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
    int last_split;  // backward-filter: this block arrived last at its tile (reduces the splits)
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

// lattice_gemm's A as a row-major matrix (RowMajorA): the forward weight, as it is or re-laid,
// and backward-data's re-laid transposed copy.
template <bool VECTOR>
struct RowMajorSource {
    const float* a;
    int pitch;

    __device__ __forceinline__ KernelTaps kernel_taps() const { return NO_KERNEL_TAPS; }
    // A[m][k] on its own (the narrow kernel's staging); the loader reads tiles of them.
    __device__ __forceinline__ float element(int m, int k, int, int) const { return __ldg(a + ((long long)m * pitch + k)); }
    template <class T>
    __device__ __forceinline__ RowMajorA<T, VECTOR> loader(int m0, int rows, int, int, const int4*) const
    {
        return RowMajorA<T, VECTOR>(a, m0, rows, pitch);
    }
};

// Backward-data's A read in place: the OIHW weight w seen as C_in x (C_out, phase taps),
// A[m][k] = w[channel][m][i][j] for k = channel*n_taps + t, at m*kernel_plane +
// channel*channel_stride + the tap table's kernel-tap offset of t (KernelTaps; taps of one phase
// are not contiguous, so each K row looks its tap up). Thread tid loads one K row,
// k = tid % BK, for ROWS consecutive rows tid / BK * ROWS + r, with 32-bit loads at any layout,
// and stores them with ROWS / 4 128-bit stores: no re-laid copy, so no launch per call (the
// optimizer updates the weight in place, so a copy cannot be kept either). (channel, tap) of the
// K row advances by BK as the B loader's do. A row past M loads row M - 1 (see RowMajorA).
template <class T>
struct TransposedWeightA {
    static constexpr int ROWS = T::BM * BK / T::THREADS;
    static_assert(ROWS % 4 == 0, "a thread's rows are stored 4 at a time");
    const float* w;
    const int4* taps;
    int row[ROWS];
    int channel, tap, channels, n_taps, channel_stride, d_channel, d_tap;
    float v[ROWS];

    __device__ __forceinline__ TransposedWeightA(const float* __restrict__ w_, const int4* taps_, int m0, int rows,
                                                 int channels_, int n_taps_, int kernel_plane)
        : w(w_), taps(taps_), channels(channels_), n_taps(n_taps_), channel_stride(rows * kernel_plane),
          d_channel(BK / n_taps_), d_tap(BK % n_taps_)
    {
        const int k = threadIdx.x % BK;
        channel = k / n_taps;
        tap = k - channel * n_taps;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) row[r] = min(m0 + local_row(r), rows - 1) * kernel_plane;
    }
    __device__ __forceinline__ static int local_row(int r) { return threadIdx.x / BK * ROWS + r; }

    __device__ __forceinline__ void fetch()
    {
        const bool k_ok = channel < channels;
        const int offset = channel * channel_stride + taps[tap].w;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) v[r] = k_ok ? __ldg(w + (row[r] + offset)) : 0.0f;
    }
    __device__ __forceinline__ void advance()
    {
        tap += d_tap;
        channel += d_channel;
        if (tap >= n_taps) {
            tap -= n_taps;
            ++channel;
        }
    }
    __device__ __forceinline__ void store(float (&tile)[BK][T::A_PITCH]) const
    {
#pragma unroll
        for (int r = 0; r < ROWS; r += 4)
            *reinterpret_cast<float4*>(&tile[threadIdx.x % BK][local_row(r)]) =
                make_float4(v[r], v[r + 1], v[r + 2], v[r + 3]);
    }
};

// lattice_gemm's A as TransposedWeightA reads it: the OIHW weight of kernel_h x kernel_w taps,
// and the kernel taps of the GEMM's taps.
struct TransposedWeightSource {
    const float* w;
    int kernel_h;
    KernelTaps taps;

    __device__ __forceinline__ KernelTaps kernel_taps() const { return taps; }
    // A[m][k] on its own, for rows m < rows (C_in) and n_taps per channel: with divisions, for
    // code outside a K loop (the narrow kernel's staging).
    __device__ __forceinline__ float element(int m, int k, int rows, int n_taps) const
    {
        const int channel = k / n_taps;
        const int2 ij = taps.grid.offset(k - channel * n_taps);
        const int kernel_plane = kernel_h * taps.kernel_w;
        return __ldg(w + (((channel * rows + m) * kernel_plane) + ij.x * taps.kernel_w + ij.y));
    }
    template <class T>
    __device__ __forceinline__ TransposedWeightA<T> loader(int m0, int rows, int channels, int n_taps,
                                                           const int4* table) const
    {
        return TransposedWeightA<T>(w, table, m0, rows, channels, n_taps, kernel_h * taps.kernel_w);
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

// What a step of BK output pixels adds to PixelWalk's state, BK = d_image*plane + d_h*out_w +
// d_w: the adds without carries (d_*), where the carries happen (ih_end, iw_end: oh reaching
// out_h, ow reaching out_w), and what each carry adds on top (*_wrap). Computed by the host
// (conv_gemm.filter_walk_steps) and passed as kernel parameters: the K loop reads them as
// constant operands, so they take no registers.
struct PixelSteps {
    int d_a, d_b, d_ih, d_iw;  // d_image*c_out*plane + rest, d_image*C*H*W + d_ih*width + d_iw, d_h*s_h, d_w*s_w
    int ih_end, iw_end;        // out_h*stride_h - pad_top, out_w*stride_w - pad_left
    int ih_wrap, iw_wrap;      // out_h*stride_h, out_w*stride_w: subtracted at a carry
    int a_wrap_h;              // (c_out - 1)*plane: the next image of grad_out
    int b_wrap_w, b_wrap_h;    // stride_h*width - iw_wrap; C*H*W - ih_wrap*width
};

// The K row of the backward-filter GEMM this thread loads, k = k_begin + tid % BK, an output
// pixel (image, oh, ow), held as the offsets the two loaders add to their columns: a_offset of
// grad_out[image][0][oh][ow], b_offset of the input window's origin x[image][0][ih][iw] (ih =
// oh*stride_h - pad_top, iw = ow*stride_w - pad_left), and ih, iw for the bounds tests. A step
// is an add per value and a predicated add per carry (ow past out_w, oh past out_h, each at
// most once a step): nothing is re-derived from (image, oh, ow) with multiplies. Both
// backward-filter loaders read the same K row, so one walk serves both: the A loader reads it,
// the B loader steps it.
struct PixelWalk {
    const PixelSteps& steps;
    int k, k_end, a_offset, b_offset, ih, iw, stride_h, plane;

    // a_channel: the grad_out channel whose offset a_offset includes (the A loader's first row).
    __device__ __forceinline__ PixelWalk(const PixelSteps& steps_, int k_begin, int k_end_, int a_channel, int c_out,
                                         int c_in, int height, int width, int out_h, int out_w, int stride_h_,
                                         int stride_w, int pad_top, int pad_left)
        : steps(steps_), k(k_begin + threadIdx.x % BK), k_end(k_end_), stride_h(stride_h_), plane(out_h * out_w)
    {
        const int image = k / plane;
        const int p = k - image * plane;
        const int oh = p / out_w;
        const int ow = p - oh * out_w;
        ih = oh * stride_h - pad_top;
        iw = ow * stride_w - pad_left;
        a_offset = (image * c_out + a_channel) * plane + p;
        b_offset = (image * c_in * height + ih) * width + iw;
    }
    __device__ __forceinline__ bool valid() const { return k < k_end; }
    __device__ __forceinline__ void step()
    {
        k += BK;
        iw += steps.d_iw;
        ih += steps.d_ih;
        a_offset += steps.d_a;
        b_offset += steps.d_b;
        if (iw >= steps.iw_end) {
            iw -= steps.iw_wrap;
            ih += stride_h;
            b_offset += steps.b_wrap_w;
        }
        if (ih >= steps.ih_end) {
            ih -= steps.ih_wrap;
            a_offset += steps.a_wrap_h;
            b_offset += steps.b_wrap_h;
        }
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
    int rows_left;  // rows from this thread's first one on
    float v[GROUPS];

    // The walk's a_offset already includes this thread's first channel, first_row(m0).
    __device__ __forceinline__ static int first_row(int m0) { return m0 + threadIdx.x / BK; }
    __device__ __forceinline__ PixelRowsA(const float* __restrict__ grad_, const PixelWalk& at_, int m0, int rows)
        : grad(grad_), at(at_), rows_left(rows - first_row(m0))
    {
    }
    __device__ __forceinline__ void fetch()
    {
        const int pixel = at.a_offset;
        const bool k_ok = at.valid();
#pragma unroll
        for (int g = 0; g < GROUPS; ++g)
            v[g] = k_ok && M_STEP * g < rows_left ? __ldg(grad + (pixel + M_STEP * g * at.plane)) : 0.0f;
    }
    __device__ __forceinline__ void advance() {}  // the B loader steps the shared walk
    __device__ __forceinline__ void store(float (&tile)[BK][T::A_PITCH]) const
    {
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) tile[threadIdx.x % BK][threadIdx.x / BK + M_STEP * g] = v[g];
    }
};

// The backward-filter GEMM orders its N columns tap-major, n = t*c_in + channel (the weight's
// OIHW index is channel*n_taps + t; the epilogue maps back), so that runs of consecutive
// columns are one tap over consecutive channels: when c_in % 4 == 0 every thread's run of 4
// shares one bounds test. Column n's table entry, as ChannelTapColumnsB reads it: {offset of
// (channel, tap t) from a window's origin, dh, dw, 0}; past N, a tap never inside.
template <int BN>
__device__ __forceinline__ void fill_tap_channel_columns(int4 (&table)[BN], const TapGrid& taps, int n0, int c_in,
                                                         int n_taps, int height, int width)
{
    for (int c = threadIdx.x; c < BN; c += blockDim.x) {
        const int n = n0 + c;
        int4 entry = make_int4(0, OUTSIDE, OUTSIDE, 0);
        if (n < c_in * n_taps) {
            const int t = n / c_in, channel = n - t * c_in;
            const int2 d = taps.offset(t);
            entry.y = d.x;
            entry.z = d.y;
            entry.x = channel * height * width + entry.y * width + entry.z;
        }
        table[c] = entry;
    }
}

// The B operand of the backward-filter GEMM: x gathered as (output pixels) x (tap, channel).
// Thread tid loads its walk's K row for GROUPS runs of 4 consecutive columns,
// tid / BK * 4 + COLUMN_STEP*g; the lanes of a warp cover 8 consecutive pixels of 4 runs, and
// B's padded pitch keeps their 128-bit stores on distinct banks. A column's table entry is one
// 128-bit shared load at a constant offset from this thread's first; predicated loads, no
// branch. SAME_TAP_RUNS (c_in % 4 == 0): a run is one tap of 4 consecutive channels, one table
// entry and one bounds test for its 4 loads, which sit a channel plane apart.
template <class T, bool SAME_TAP_RUNS>
struct TapChannelColumnsB {
    static constexpr int GROUPS = BK * T::BN / 4 / T::THREADS;
    static constexpr int COLUMN_STEP = T::THREADS / BK * 4;
    const float* x;
    PixelWalk& at;
    const int4* columns;  // this thread's first column
    int height, width;
    float4 v[GROUPS];

    __device__ __forceinline__ TapChannelColumnsB(const float* __restrict__ x_, PixelWalk& at_, const int4* columns_,
                                                  int height_, int width_)
        : x(x_), at(at_), columns(columns_ + threadIdx.x / BK * 4), height(height_), width(width_)
    {
    }
    __device__ __forceinline__ static int column(int g) { return threadIdx.x / BK * 4 + COLUMN_STEP * g; }
    __device__ __forceinline__ void fetch()
    {
        // A K row past the end tests as outside every column, so no element needs a third test.
        const int ih = at.valid() ? at.ih : OUTSIDE;
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) {
            float e[4];
            if (SAME_TAP_RUNS) {
                const int4 c = columns[COLUMN_STEP * g];
                const bool in = inside(ih + c.y, at.iw + c.z, height, width);
                const int offset = at.b_offset + c.x, plane = height * width;
#pragma unroll
                for (int j = 0; j < 4; ++j) e[j] = in ? __ldg(x + (offset + j * plane)) : 0.0f;
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int4 c = columns[COLUMN_STEP * g + j];
                    e[j] = 0.0f;
                    if (inside(ih + c.y, at.iw + c.z, height, width)) e[j] = __ldg(x + (at.b_offset + c.x));
                }
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

// The forward / backward-data kernel body: A (rows x channels*n_taps, as `a_source` reads it:
// RowMajorSource or TransposedWeightSource) times B gathered from src at the pixels `columns`
// names, handed to `epilogue(acc, thread tile, m0, n0)`.
template <int BM, int BN, class ASource, class Columns, class Epilogue>
__device__ __forceinline__ void lattice_gemm(Shared<BM, BN>& shared, const ASource& a_source, int rows,
                                             const float* __restrict__ src, int channels, int n_taps,
                                             const TapGrid& taps, int src_h, int src_w, const Columns& columns,
                                             const Epilogue& epilogue)
{
    using T = gemm::Tile<BM, BN>;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int depth = channels * n_taps;
    fill_tap_table(shared.taps, taps, n_taps, src_w, a_source.kernel_taps());
    __syncthreads();

    const gemm::ThreadTile<T> t;
    auto a_loader = a_source.template loader<T>(m0, rows, channels, n_taps, shared.taps);
    PixelColumnsB<T> b_loader(src, shared.taps, n0, columns, channels, n_taps, src_h, src_w);
    float acc[8][8];
    gemm::mainloop(acc, shared.tiles, a_loader, b_loader, (depth + BK - 1) / BK, t);
    epilogue(acc, t, m0, n0);
}

// conv2d_gemm_v2's body: the lattice GEMM stored by StoreLattice.
template <int BM, int BN, class ASource>
__device__ __forceinline__ void lattice_conv(Shared<BM, BN>& shared, const ASource& a_source,
                                             const float* __restrict__ src, const float* __restrict__ bias,
                                             float* __restrict__ dst, int rows, int channels, int n_taps,
                                             const TapGrid& taps, int src_h, int src_w, int batch, int lattice_h,
                                             int lattice_w, int src_step_h, int src_step_w, int src_origin_h,
                                             int src_origin_w, int dst_h, int dst_w, int dst_step_h, int dst_step_w,
                                             int dst_origin_h, int dst_origin_w, int has_bias, int relu)
{
    const int columns = batch * lattice_h * lattice_w;
    const LatticeColumns lattice{columns, lattice_h, lattice_w, src_step_h, src_step_w, src_origin_h, src_origin_w};
    const StoreLattice<gemm::Tile<BM, BN>> store{dst, rows, columns, lattice_h, lattice_w, dst_h, dst_w, dst_step_h,
                                                 dst_step_w, dst_origin_h, dst_origin_w, has_bias ? bias : nullptr,
                                                 relu != 0};
    lattice_gemm<BM, BN>(shared, a_source, rows, src, channels, n_taps, taps, src_h, src_w, lattice, store);
}

// The bias gradient's share of a backward-filter block: out[m] = sum of grad_out[k][m] over
// the output pixels k in [k_begin, k_end), for the block's rows m0 <= m < m0 + BM. Run after the
// K loop by the blocks of the first column tile only (a pass over their A rows, 1 / (column
// tiles) of the A reads the K loop made), so the weight-gradient GEMM's hot loop carries no
// bias column. Warp w sums rows w, w + warps, ...; its lanes take every 32nd pixel of each
// image's run (consecutive lanes, consecutive addresses), then a fixed shuffle tree adds the
// lanes: the same order on every run.
template <int BM>
__device__ __forceinline__ void bias_partial_sums(const float* __restrict__ grad_out, float* __restrict__ out, int m0,
                                                  int c_out, int k_begin, int k_end, int plane)
{
    const int warps = blockDim.x / gemm::WARP, lane = threadIdx.x % gemm::WARP;
    const int first_image = k_begin / plane, last_image = (k_end - 1) / plane;
    for (int m = m0 + threadIdx.x / gemm::WARP; m < min(m0 + BM, c_out); m += warps) {
        float sum = 0.0f;
        for (int image = first_image; image <= last_image; ++image) {
            const int start = image * plane;
            const float* row = grad_out + ((long long)image * c_out + m) * plane;
            for (int p = max(k_begin - start, 0) + lane; p < min(k_end - start, plane); p += gemm::WARP)
                sum += __ldg(row + p);
        }
#pragma unroll
        for (int offset = gemm::WARP / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
        if (lane == 0) out[m] = sum;
    }
}

// The split-K reduce without a second launch: a block that has written its partials takes a
// ticket for its output tile; the last of the tile's gridDim.z blocks to arrive sums every
// split's partials of the tile, in split order (the additions of conv2d_split_k_reduce_v2, so
// the same bits), into grad_weight (and grad_bias), and resets the ticket for the next launch.
// The fence before the ticket makes this block's partials visible before its ticket (release);
// the fence after it orders the last block's reads after every ticket it counted (acquire); the
// partials are read volatile, past the incoherent L1. Not inlined: the K loop's register
// allocation then never sees this code (inlined, it made the loop spill).
template <int BM, int BN>
__device__ __noinline__ void reduce_splits_if_last(int* last_split, const float* partials, const float* bias_partials,
                                                   long long split_stride, float* grad_weight, float* grad_bias,
                                                   int* tickets, int columns, int c_in, int c_out, int n_taps)
{
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* ticket = tickets + blockIdx.y * gridDim.x + blockIdx.x;
        const int arrived = atomicAdd(ticket, 1);
        __threadfence();
        *last_split = arrived == (int)gridDim.z - 1;
        if (*last_split) atomicExch(ticket, 0);
    }
    __syncthreads();
    if (!*last_split) return;
    const gemm::ThreadTile<gemm::Tile<BM, BN>> t;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const volatile float* split = partials;
    for (int c = 0; c < 8; ++c) {
        const int n = n0 + t.column(c);
        if (n >= columns) continue;
        const int tap = n / c_in;
        const int weight = (n - tap * c_in) * n_taps + tap;
        for (int r = 0; r < 8; ++r) {
            const int m = m0 + t.row(r);
            if (m >= c_out) continue;
            const long long i = (long long)m * columns + weight;
            float sum = 0.0f;
            for (int z = 0; z < (int)gridDim.z; ++z) sum += split[z * split_stride + i];
            grad_weight[i] = sum;
        }
    }
    if (bias_partials == nullptr || blockIdx.x != 0) return;
    const volatile float* bias_split = bias_partials;
    for (int m = m0 + threadIdx.x; m < min(m0 + BM, c_out); m += blockDim.x) {
        float sum = 0.0f;
        for (int z = 0; z < (int)gridDim.z; ++z) sum += bias_split[z * split_stride + m];
        grad_bias[m] = sum;
    }
}

// The backward-filter kernel body: block z's partial sum over K indices [k_begin, k_end) of
// grad_w (rows x columns, OIHW) into partials[z], plain stores (the reduce kernel adds them).
template <int BM, int BN, bool SAME_TAP_RUNS>
__device__ __forceinline__ void weight_gradient_gemm(Shared<BM, BN>& shared, const float* __restrict__ x,
                                                     const float* __restrict__ grad_out, const TapGrid& taps,
                                                     float* __restrict__ partials, float* __restrict__ bias_partials,
                                                     long long split_stride, float* __restrict__ grad_weight,
                                                     float* __restrict__ grad_bias, int* __restrict__ tickets,
                                                     int batch, int c_in, int height,
                                                     int width, int c_out, int n_taps, int stride_h, int stride_w,
                                                     int pad_top, int pad_left, int out_h, int out_w, int k_per_split,
                                                     const PixelSteps& steps)
{
    using T = gemm::Tile<BM, BN>;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int columns = c_in * n_taps;
    const int k_begin = blockIdx.z * k_per_split;
    // Not min(K, k_begin + k_per_split): that sum can pass 2^31 for the last split.
    const int k_end = k_begin + min(k_per_split, batch * out_h * out_w - k_begin);
    fill_tap_channel_columns(shared.columns, taps, n0, c_in, n_taps, height, width);
    __syncthreads();

    const gemm::ThreadTile<T> t;
    PixelWalk walk(steps, k_begin, k_end, PixelRowsA<T>::first_row(m0), c_out, c_in, height, width, out_h, out_w,
                   stride_h, stride_w, pad_top, pad_left);
    PixelRowsA<T> a_loader(grad_out, walk, m0, c_out);
    TapChannelColumnsB<T, SAME_TAP_RUNS> b_loader(x, walk, shared.columns, height, width);
    float acc[8][8];
    // Four K tiles a trip: what a trip re-derives (shared addresses the registers could not keep)
    // is spread over twice the tiles of the forward kernel's two.
    gemm::mainloop<4>(acc, shared.tiles, a_loader, b_loader, (k_end - k_begin + BK - 1) / BK, t);

    if (bias_partials != nullptr && blockIdx.x == 0)
        bias_partial_sums<BM>(grad_out, bias_partials + blockIdx.z * split_stride, m0, c_out, k_begin, k_end,
                              out_h * out_w);
    float* partial = partials + blockIdx.z * split_stride;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int n = n0 + t.column(c);
        if (n >= columns) continue;
        const int tap = n / c_in;
        const int weight = (n - tap * c_in) * n_taps + tap;  // the OIHW column of (tap, channel)
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            const int m = m0 + t.row(r);
            if (m < c_out) partial[(long long)m * columns + weight] = acc[r][c];
        }
    }
    if (tickets != nullptr)
        reduce_splits_if_last<BM, BN>(&shared.last_split, partials, bias_partials, split_stride, grad_weight, grad_bias,
                                      tickets, columns, c_in, c_out, n_taps);
}

}  // namespace conv

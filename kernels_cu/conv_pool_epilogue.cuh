// conv_pool_epilogue.cuh: convolution + bias + ReLU + 2x2 max-pool (stride 2) as one GEMM of
// conv_tiles.cuh: a column order that puts each pool window's outputs in 4 adjacent GEMM columns
// (held by one thread: gemm_core.cuh's threads own 4-wide column runs), and an epilogue that
// adds the bias, applies the ReLU and reduces each window in registers. The convolution output
// itself is never stored.
//
// Column n is position p = n % 4 of pool window n / 4, in row-major window order (p = 2*dy + dx);
// windows are numbered as lattice_pixel numbers the pixels of the (batch, pool_h, pool_w)
// output. Window (i, j) covers the convolution outputs (2i - pad_h + dy, 2j - pad_w + dx):
// positions outside the conv_h x conv_w output (a pool padding of 1, a ceil_mode window past
// the edge) gather nothing and take no part in the maximum; a trailing row or column that no
// window covers (odd size, floor mode) is never computed.
// The maximum follows max_pool2d_forward_v1 (pool.cu) exactly: it starts at the window's first
// position inside the output, and a later position wins when strictly greater or a first NaN;
// the index is that position's q * conv_w + r in the output plane, int32.
// Limits: 4 * batch * pool_h * pool_w below 2^31 - 128 (the GEMM's N), as for every lattice.

#include "conv_tiles.cuh"

namespace conv {

struct PooledColumns {
    int windows, pool_h, pool_w, pad_h, pad_w, conv_h, conv_w;
    int step_h, step_w, origin_h, origin_w;  // the convolution's stride and -padding

    // The convolution output pixel (q, r) of image `image` that column n holds; false for a
    // column past N or a position outside the output.
    __device__ __forceinline__ bool conv_pixel(int n, int& image, int& q, int& r) const
    {
        const int window = n / 4, p = n % 4;
        if (window >= windows) return false;
        const LatticePixel at = lattice_pixel(window, pool_h, pool_w);
        image = at.image;
        q = 2 * at.q - pad_h + p / 2;
        r = 2 * at.r - pad_w + p % 2;
        return inside(q, r, conv_h, conv_w);
    }

    // PixelColumnsB's contract (see LatticeColumns).
    __device__ __forceinline__ bool locate(int n, int& image, int& row, int& col) const
    {
        int q, r;
        if (!conv_pixel(n, image, q, r)) return false;
        row = origin_h + step_h * q;
        col = origin_w + step_w * r;
        return true;
    }
};

// out[image][m][i][j] = max over window (i, j) of relu(C[m][n] + bias[m]), indices[...] its
// position; NCHW (batch, rows, pool_h, pool_w) both.
template <class T>
struct StoreReluMaxPool2x2 {
    float* out;
    int* indices;
    int rows;
    PooledColumns columns;
    const float* bias;  // nullptr: none

    __device__ __forceinline__ void operator()(const float (&acc)[8][8], const gemm::ThreadTile<T>& t, int m0,
                                               int n0) const
    {
        const long long out_plane = (long long)columns.pool_h * columns.pool_w;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int first = n0 + t.column(4 * half);  // a multiple of 4: the window's position 0
            if (first / 4 >= columns.windows) continue;
            bool held[4];
            int position[4];
            int image = 0;
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                int q = 0, r = 0;
                held[p] = columns.conv_pixel(first + p, image, q, r);
                position[p] = q * columns.conv_w + r;
            }
            const LatticePixel at = lattice_pixel(first / 4, columns.pool_h, columns.pool_w);
            const long long o = (long long)at.image * rows * out_plane + (long long)at.q * columns.pool_w + at.r;
            // A window always holds a position (the pool's padding is at most half its size).
            const int start = held[0] ? position[0] : held[1] ? position[1] : held[2] ? position[2] : position[3];
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                const int m = m0 + t.row(r);
                if (m >= rows) continue;
                const float b = bias ? __ldg(bias + m) : 0.0f;
                float best = -__int_as_float(0x7f800000);
                int best_at = start;
#pragma unroll
                for (int p = 0; p < 4; ++p) {
                    float v = acc[r][4 * half + p] + b;
                    if (v < 0.0f) v = 0.0f;  // ReLU; a NaN stays NaN
                    const bool wins = held[p] && (v > best || (v != v && best == best));
                    best_at = wins ? position[p] : best_at;
                    best = wins ? v : best;
                }
                out[o + m * out_plane] = best;
                indices[o + m * out_plane] = best_at;
            }
        }
    }
};

// conv2d_relu_max_pool2x2_v2's body.
template <int BM, int BN, bool VECTOR_A>
__device__ __forceinline__ void conv_relu_max_pool2x2(Shared<BM, BN>& shared, const float* __restrict__ a,
                                                      const float* __restrict__ src, const float* __restrict__ bias,
                                                      float* __restrict__ out, int* __restrict__ indices, int rows,
                                                      int channels, int n_taps, const TapGrid& taps, int src_h,
                                                      int src_w, int batch, int conv_h, int conv_w, int step_h,
                                                      int step_w, int origin_h, int origin_w, int pool_h, int pool_w,
                                                      int pad_h, int pad_w, int has_bias, int a_pitch)
{
    const PooledColumns columns{batch * pool_h * pool_w, pool_h, pool_w, pad_h, pad_w, conv_h, conv_w,
                                step_h, step_w, origin_h, origin_w};
    const StoreReluMaxPool2x2<gemm::Tile<BM, BN>> store{out, indices, rows, columns, has_bias ? bias : nullptr};
    lattice_gemm<BM, BN>(shared, RowMajorSource<VECTOR_A>{a, a_pitch}, rows, src, channels, n_taps, taps, src_h, src_w,
                         columns, store);
}

}  // namespace conv

"""Convolution in the batch-innermost layout: images (C, H, W, N), weights OIHW as the layers hold them.

With the batch innermost, the inputs one kernel offset ``(i, j)`` reads for a row of outputs are
one contiguous run of ``W_out * N`` values (``W_out`` runs of N at a column stride), so the
column matrix ``cols`` (K = C*KH*KW rows ordered as the weight's (C, KH, KW), columns
(H_out, W_out, N)) is one strided copy of the padded input, the forward one GEMM
``W (C_out, K) @ cols`` whose result is already the (C_out, H_out, W_out, N) output, and the
weight gradient ``grad (C_out, P) @ cols.T``. Backward data is
``W.T @ grad``, then col2im: KH*KW strided slice-adds into a zeroed padded gradient, block by
block for a small K (the block of column gradients still in cache when it is added).

The forward and the weight gradient run in blocks of whole output rows, at most about
``BLOCK_COLUMNS`` columns each (:func:`row_blocks`) where K is small: each block's columns are
copied into a small buffer that stays in cache while the product reads it, and rebuilt from the
(kept) padded input for the weight gradient rather than kept: the whole K x P matrix (10 MB for a
lane of LeNet's conv1) costs more to write to memory and read back than to copy twice from
cache. One-thread OpenBLAS also runs these skinny products (K = 25, C_out = 6 for LeNet's
conv1) 2-3x faster on blocks of a few thousand columns than on one of 100k (benchmarks/NOTES.md).

Geometry (padding resolved to top/left, output size, the rows and columns the windows reach) is
the NCHW path's, :func:`gpuconv.functional.conv._geometry`, so both paths agree on every size.
:class:`ConvPlan` resolves it once per input shape with the blocks and the views a stage reads
every step (a lane's buffers are the same arrays from step to step).
"""
from __future__ import annotations

import numpy as np

from ..functional.conv import _geometry, _padded_extent
from .kept import KeptViews

__all__ = ["geometry", "padded_shape", "interior", "needs_padding", "row_blocks", "im2col", "col2im", "ConvPlan"]

# At most this many columns (output positions) a block: on one thread, LeNet's conv1 products ran
# 2-3x faster on 2k-4k columns than on 7k or more; conv2's (K 150) 1.3x.
BLOCK_COLUMNS = 4096
# Blocks only where one of BLOCK_COLUMNS columns is at most this large (K * BLOCK_COLUMNS * itemsize):
# a larger K (AlexNet's 363-3456) keeps its products whole, as they run well, and cols is built once.
BLOCK_BYTES = 4 << 20


def geometry(input_shape, conv):
    """The :class:`~gpuconv.functional.conv._Geometry` of ``conv`` (a Conv2d) on a (C, H, W, N) input."""
    c, h, w, n = input_shape
    return _geometry((n, c, h, w), conv.weight.data.shape, conv.stride, conv.padding, conv.dilation)


def needs_padding(g) -> bool:
    """Whether the windows reach past the input (padding), so they read a zero-bordered copy."""
    return _padded_extent(g) != (g.height, g.width)


def padded_shape(g) -> tuple[int, int, int, int]:
    full_h, full_w = _padded_extent(g)
    return g.c_in, full_h, full_w, g.batch


def interior(padded, g):
    """The input's place inside a padded (C, H_pad, W_pad, N) array (a view)."""
    return padded[:, g.pad_top:g.pad_top + g.height, g.pad_left:g.pad_left + g.width]


def _windows(padded, g):
    """The (C, KH, KW, H_out, W_out, N) view of every window of a padded input: im2col, uncopied."""
    s_c, s_h, s_w, s_n = padded.strides
    return np.lib.stride_tricks.as_strided(
        padded, shape=(g.c_in, g.kernel_h, g.kernel_w, g.out_h, g.out_w, g.batch),
        strides=(s_c, s_h * g.dilation_h, s_w * g.dilation_w, s_h * g.stride_h, s_w * g.stride_w, s_n),
        writeable=False)


def block_rows(g, itemsize: int) -> int:
    """Output rows a block of the blocked products holds: as many whole rows as fit in
    ``BLOCK_COLUMNS`` columns, at least one; all of them (one block) for a large K."""
    if g.patch_size * BLOCK_COLUMNS * itemsize > BLOCK_BYTES:
        return g.out_h
    return min(g.out_h, max(1, BLOCK_COLUMNS // (g.out_w * g.batch)))


def row_blocks(g, itemsize: int):
    """``(rows, columns)`` slices that cover the output: runs of ``block_rows`` whole output
    rows (the last one shorter), and the columns of the flat (H_out*W_out*N) output they are."""
    row_columns, step = g.out_w * g.batch, block_rows(g, itemsize)
    for top in range(0, g.out_h, step):
        bottom = min(g.out_h, top + step)
        yield slice(top, bottom), slice(top * row_columns, bottom * row_columns)


def _im2col_views(padded, g, rows, block):
    """``(cols, destination, windows)``: the (K, columns) front of ``block`` that holds the columns
    of the output rows ``rows``, shaped as their windows, and the windows' view of ``padded``."""
    windows = _windows(padded, g)[:, :, :, rows]
    cols = block[:, :windows[0, 0, 0].size]
    return cols, cols.reshape(windows.shape), windows


def im2col(padded, g, rows, block) -> np.ndarray:
    """The columns of the output rows ``rows`` (a slice of ``row_blocks``) from a padded
    (C, H_pad, W_pad, N) input, copied into the front of ``block`` (K, at least their count) and
    returned as a (K, columns) view: one copy whose inner runs are W_out*N long at stride 1."""
    cols, destination, windows = _im2col_views(padded, g, rows, block)
    np.copyto(destination, windows)
    return cols


def col2im(cols, g, rows, padded) -> None:
    """The transpose of :func:`im2col`: add the columns ``cols`` of the output rows ``rows`` (a
    slice of ``row_blocks``) into ``padded`` (C, H_pad, W_pad, N) at the input positions they were
    copied from. The lattices of different kernel offsets overlap, so they are added one offset
    at a time; the caller zeroes ``padded`` before the first block."""
    first, count = rows.start, rows.stop - rows.start
    columns = cols.reshape(g.c_in, g.kernel_h, g.kernel_w, count, g.out_w, g.batch)
    for i in range(g.kernel_h):
        top = first * g.stride_h + i * g.dilation_h
        input_rows = slice(top, top + (count - 1) * g.stride_h + 1, g.stride_h)
        for j in range(g.kernel_w):
            left = j * g.dilation_w
            padded[:, input_rows, left:left + (g.out_w - 1) * g.stride_w + 1:g.stride_w] += columns[:, i, j]


class ConvPlan:
    """A Conv2d (``conv``) on (C, H, W, N) inputs of one ``input_shape``, resolved once: its
    geometry, whether it pads, its row blocks and buffer shapes; and, kept while a lane calls it
    with the same arrays, the views of them each block reads and writes."""

    def __init__(self, input_shape, conv, itemsize: int):
        self.input_shape, self.itemsize = tuple(input_shape), itemsize
        self.geometry = g = geometry(self.input_shape, conv)
        self.pads = needs_padding(g)
        self.padded_shape = padded_shape(g)
        self.output_shape = (g.c_out, g.out_h, g.out_w, g.batch)
        self.blocks = tuple(row_blocks(g, itemsize))
        self.block_shape = (g.patch_size, block_rows(g, itemsize) * g.out_w * g.batch)
        self._views = KeptViews()

    def interior(self, padded, name: str):
        """The input's place in the padded buffer ``padded`` (``name``: which of the stage's)."""
        return self._views.get(f"interior of {name}", (padded,), lambda padded: interior(padded, self.geometry))

    def forward_views(self, source, block, out):
        """Per block: ``(cols, destination, windows, output columns)``, im2col's views
        (:func:`im2col`: ``np.copyto(destination, windows)`` fills ``cols``) and the block's columns of
        the (C_out, P) output."""
        def build(source, block, out):
            flat = out.reshape(out.shape[0], -1)
            return tuple((*_im2col_views(source, self.geometry, rows, block), flat[:, columns])
                         for rows, columns in self.blocks)

        return self._views.get("forward", (source, block, out), build)

    def gradient_columns(self, grad, block):
        """Per block: ``(grad columns, column gradients)``, the block's columns of the (C_out, P)
        gradient and the front of ``block`` its column gradients fill."""
        def build(grad, block):
            flat = grad.reshape(grad.shape[0], -1)
            return tuple((flat[:, columns], block[:, :columns.stop - columns.start]) for _, columns in self.blocks)

        return self._views.get("gradient", (grad, block), build)

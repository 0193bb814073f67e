"""Convolution in the batch-innermost layout: images (C, H, W, N), weights OIHW as the layers hold them.

With the batch innermost, the inputs one kernel offset ``(i, j)`` reads for a row of outputs are
one contiguous run of ``W_out * N`` values (``W_out`` runs of N at a column stride), so the
column matrix ``cols`` (K = C*KH*KW rows ordered as the weight's (C, KH, KW), columns
(H_out, W_out, N)) is one strided copy of the padded input, the forward one GEMM
``W (C_out, K) @ cols`` whose result is already the (C_out, H_out, W_out, N) output, and the
weight gradient ``grad (C_out, P) @ cols.T`` reuses the forward's ``cols``. Backward data is
``W.T @ grad``, then col2im: KH*KW strided slice-adds into a zeroed padded gradient.

The forward and the weight gradient run in blocks of whole output rows, about
``BLOCK_COLUMNS`` columns each (:func:`row_blocks`): the forward fills one block of ``cols`` and
multiplies it while it is still in cache, and one-thread OpenBLAS runs these skinny products
(K = 25 and C_out = 6 for LeNet's conv1) up to 2-3x faster on blocks of a few thousand
columns than on one of 100k (see benchmarks/NOTES.md).

Geometry (padding resolved to top/left, output size, the rows and columns the windows reach) is
the NCHW path's, :func:`gpuconv.functional.conv._geometry`, so both paths agree on every size.
"""
from __future__ import annotations

import numpy as np

from ..functional.conv import _geometry, _padded_extent

__all__ = ["geometry", "padded_shape", "interior", "needs_padding", "row_blocks", "im2col", "col2im"]

# Columns of cols (output positions) per block of the blocked products: measured on LeNet's and
# AlexNet's shapes, one thread; 2k-4k columns were best for conv1, neutral for the wider ones.
BLOCK_COLUMNS = 4096


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


def row_blocks(g):
    """``(rows, columns)`` slices that cover the output: runs of whole output rows, and the
    columns of cols (H_out*W_out*N) they are, about ``BLOCK_COLUMNS`` each."""
    row_columns = g.out_w * g.batch
    step = max(1, round(BLOCK_COLUMNS / row_columns))
    for top in range(0, g.out_h, step):
        bottom = min(g.out_h, top + step)
        yield slice(top, bottom), slice(top * row_columns, bottom * row_columns)


def im2col(padded, g, cols, rows=slice(None)) -> None:
    """Fill ``cols`` (K, H_out*W_out*N) from a padded (C, H_pad, W_pad, N) input, or only the
    columns of the output rows ``rows``: one copy whose inner runs are W_out*N long at stride 1."""
    columns = cols.reshape(g.c_in, g.kernel_h, g.kernel_w, g.out_h, g.out_w, g.batch)
    np.copyto(columns[:, :, :, rows], _windows(padded, g)[:, :, :, rows])


def col2im(cols, g, padded) -> None:
    """The transpose of :func:`im2col`: ``padded`` (C, H_pad, W_pad, N) := the sum of every
    column's values at the input positions it was copied from. The lattices of different kernel
    offsets overlap, so they are added one offset at a time."""
    padded.fill(0)
    columns = cols.reshape(g.c_in, g.kernel_h, g.kernel_w, g.out_h, g.out_w, g.batch)
    for i in range(g.kernel_h):
        top = i * g.dilation_h
        rows = slice(top, top + (g.out_h - 1) * g.stride_h + 1, g.stride_h)
        for j in range(g.kernel_w):
            left = j * g.dilation_w
            padded[:, rows, left:left + (g.out_w - 1) * g.stride_w + 1:g.stride_w] += columns[:, i, j]

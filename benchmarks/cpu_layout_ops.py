"""Pooling and LRN of the NumPy path: the NCHW functional ops against the (C, H, W, N) layout's
(gpuconv.cpu), on the same data, calls alternated, median of repeats after a warm-up.

    PYTHONPATH=. python3 benchmarks/cpu_layout_ops.py [--repeats 9] [--only NAME]

Prints one row per op: the floor (compulsory bytes over --bandwidth GB/s), the NCHW time, ours.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import gpuconv.functional as F
from gpuconv.cpu import norm as cpu_norm
from gpuconv.cpu import pool as cpu_pool

LRN = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)


def _chwn(x):
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


def max_pool_case(name, nchw_shape, kernel, stride, relu):
    """(name, floor bytes, [nchw forward, nchw backward], [ours forward, ours backward]) closures."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(nchw_shape).astype(np.float32)
    xc = _chwn(x)
    out, codes = cpu_pool.max_pool2d(xc, kernel, stride, relu=relu)
    g = rng.standard_normal(out.shape).astype(np.float32)
    g_nchw = np.ascontiguousarray(g.transpose(3, 0, 1, 2))
    buffers = dict(out=np.empty_like(out), indices_out=np.empty_like(codes))
    grad = np.empty_like(xc)
    nchw_out, nchw_idx = F.max_pool2d(F.relu(x) if relu else x, kernel, stride, return_indices=True)

    def nchw_forward():
        F.max_pool2d(F.relu(x) if relu else x, kernel, stride, return_indices=True)

    def nchw_backward():
        if relu:
            F.max_pool2d_relu_backward(g_nchw, nchw_idx, nchw_out, x.shape, kernel, stride)
        else:
            F.max_pool2d_backward(g_nchw, nchw_idx, x.shape, kernel, stride)

    def forward():
        cpu_pool.max_pool2d(xc, kernel, stride, relu=relu, **buffers)

    def backward():
        cpu_pool.max_pool2d_backward(g, codes, xc.shape, kernel, stride, relu_output=out if relu else None, out=grad)

    forward_bytes = 4 * x.size + 5 * out.size
    backward_bytes = (9 if relu else 5) * out.size + 4 * x.size
    return [(f"{name} forward", forward_bytes, nchw_forward, forward),
            (f"{name} backward", backward_bytes, nchw_backward, backward)]


def lrn_case(name, nchw_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(nchw_shape).astype(np.float32)
    xc = _chwn(x)
    g = rng.standard_normal(nchw_shape).astype(np.float32)
    gc = _chwn(g)
    out, saved = cpu_norm.local_response_norm(xc, **LRN)
    nchw_out = F.local_response_norm(x, **LRN)
    buffer, grad, saved_buffer = np.empty_like(xc), np.empty_like(xc), np.empty_like(saved)

    def nchw_forward():
        F.local_response_norm(x, **LRN)

    def nchw_backward():
        F.local_response_norm_backward(g, x, nchw_out, **LRN)

    def forward():
        cpu_norm.local_response_norm(xc, **LRN, out=buffer, saved=saved_buffer)

    def backward():
        cpu_norm.local_response_norm_backward(gc, xc, out, saved, **LRN, out=grad)

    return [(f"{name} forward", 8 * x.size, nchw_forward, forward),
            (f"{name} backward", 16 * x.size, nchw_backward, backward)]


def cases():
    return [*max_pool_case("LeNet@256 relu+pool1 2x2/2 (256, 6, 28, 28)", (256, 6, 28, 28), 2, 2, True),
            *max_pool_case("LeNet@256 relu+pool2 2x2/2 (256, 16, 10, 10)", (256, 16, 10, 10), 2, 2, True),
            *lrn_case("AlexNet@16 lrn1 (16, 96, 55, 55)", (16, 96, 55, 55)),
            *max_pool_case("AlexNet@16 pool1 3x3/2 (16, 96, 55, 55)", (16, 96, 55, 55), 3, 2, False),
            *lrn_case("AlexNet@16 lrn2 (16, 256, 27, 27)", (16, 256, 27, 27)),
            *max_pool_case("AlexNet@16 pool2 3x3/2 (16, 256, 27, 27)", (16, 256, 27, 27), 3, 2, False),
            *max_pool_case("AlexNet@16 pool5 3x3/2 (16, 256, 13, 13)", (16, 256, 13, 13), 3, 2, False)]


def median_times(functions, repeats):
    """Median seconds of each function, the functions called in turn, after one warm-up round."""
    times = [[] for _ in functions]
    for round_ in range(repeats + 1):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            function()
            if round_:
                times[index].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--bandwidth", type=float, default=22.0, help="copy bandwidth, GB/s, for the floor")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args()
    print("| op | floor (ms) | NCHW functional (ms) | (C, H, W, N) (ms) | NCHW / ours |")
    print("|---|---:|---:|---:|---:|")
    for name, floor_bytes, nchw, ours in cases():
        if args.only not in name:
            continue
        before, after = median_times([nchw, ours], args.repeats)
        floor = floor_bytes / args.bandwidth / 1e6
        print(f"| {name} | {floor:.2f} | {before * 1e3:.2f} | {after * 1e3:.2f} | {before / after:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

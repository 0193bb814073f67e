"""Benchmarks: every kernel and a whole training step, on every contender, side by side.

``gpuconv bench`` (or ``python -m gpuconv.bench``) measures, in one run on one machine:

* kernels -- conv2d forward, backward-data (``conv2d_input``) and backward-filter
  (``conv2d_weight``), max/avg pooling forward and backward, ReLU and LRN forward and backward --
  on the layer shapes of ``models.lenet5`` (batch 256) and ``models.alexnet`` (batch 128), read off
  the models themselves, and on the five convolutions of the classic convnet-benchmarks AlexNet
  table (batch 128);
* a training step (forward, backward, SGD update) of LeNet-5 and AlexNet, and one LeNet-5 epoch
  over Fashion-MNIST (60,000 images; on the CPU timed on ``--cpu-epoch-limit`` images and
  extrapolated, which the row says);

for each contender: the NumPy CPU path, every registered version of our CUDA kernels (version 0
of convolution is the CuPy im2col + cuBLAS baseline), and PyTorch on the same device (oneDNN on
the CPU; cuDNN in strict FP32 and in TF32 on the GPU). Reports go to ``runs/bench/<name>/``.

Method: warm-up calls first; then each repeat is timed on its own, by a pair of device events
around the call on the GPU and by ``time.perf_counter`` on the CPU; rows report the median and
the spread (IQR and min/max). Inputs are fresh random normals, rotated among up to 8 buffer sets
so that each call reads its inputs from memory, not from the cache the previous call warmed.
Peaks (a large FP32 matmul and a large copy) are measured in the same run. Rows run in worker
processes: one per case group on the GPU, so that a sticky CUDA error costs one row, not the
table; one for the CPU, with ``OPENBLAS_THREAD_TIMEOUT`` set before NumPy loads.

The modules, each owning one thing:

==============  ===============================================================================
``cases``       specs (Conv, Pool, Relu, LRN, TrainStep) with FLOP/byte accounting; the cases
                of a run (``SECTIONS``, in run order); the floors
``workloads``   what a contender runs for a kernel case, through gpuconv or PyTorch
``training``    training-step and epoch workloads
``contenders``  the contenders (``Contender`` subclasses) and ``contenders_for()``, their list
``timing``      timers (CPU clock, device events), warm-up and repeats, median/IQR
``machine``     CPU/GPU description, versions, measured peaks, device health
``rows``        ``Row``, ``run_row`` (one contender on one case), derived columns
``runner``      rows grouped into jobs and run in worker processes, failures contained
``worker``      the worker process's entry point
``reports``     results.md / .json / .png, each written atomically
``cli``         ``gpuconv bench``: options, selection, the run, the summary
==============  ===============================================================================

How to add ...

* a contender (say CUDA-graph replay of the training step, or host time on ``emu`` under a dry
  run): subclass :class:`~gpuconv.bench.contenders.Contender` in ``contenders.py`` -- ``name``,
  ``device`` (its timer and its job: 'cuda' rows run a process per case group; any other device
  one process), ``family``, ``available()``, ``applies(case)`` (e.g. only ``op == 'step'``),
  ``workload(case, rng)`` returning a ``Workload(make, run)`` -- and append it in
  :func:`~gpuconv.bench.contenders.contenders_for`. Rows, columns, JSON, chart follow.
* a case: a spec dataclass in ``cases.py`` (``batch``, ``ops``, ``flops(op)``, ``bytes(op)``,
  ``describe()``) if the shapes are new, an entry in ``cases.SECTIONS`` (its place is its run
  priority), and a branch for each new op in ``workloads.gpuconv_op`` and ``workloads.torch_op``
  (an op whose two APIs share PyTorch's signatures, as the convolutions do, shares one helper).
* facts per row (the conv kernel chosen, the useful-MAC share): return them from the workload as
  ``Workload(make, run, extra={"kernel": ..., "useful_macs": 0.83})``; they land in the row's
  ``extra`` in results.json and as ``key: value`` in its note in results.md.
"""
from .cases import (DEFAULT_BATCH, EPOCH_IMAGES, LRN, SECTIONS, Case, Conv, Pool, Relu, TrainStep, all_cases,
                    convnet_benchmarks_layers, floors, floors_markdown, kernel_cases, model_layers, training_cases)
from .cli import main, parse_args, select_cases
from .contenders import (BASELINE_VERSION_OPS, BENCHMARKED_OPS, NUMPY, TORCH_REFERENCE, Contender, Gpuconv, Torch,
                         contenders_for, kernel_versions)
from .machine import device_slug, machine_info, measure_peaks
from .reports import write_reports
from .rows import Row, annotate, run_row
from .timing import MAX_BUFFER_SETS, CpuTimer, EventTimer, Stats, buffer_sets, summarize, time_calls
from .workloads import Workload

__all__ = [
    "DEFAULT_BATCH", "EPOCH_IMAGES", "LRN", "SECTIONS", "Case", "Conv", "Pool", "Relu", "TrainStep", "all_cases",
    "convnet_benchmarks_layers", "floors", "floors_markdown", "kernel_cases", "model_layers", "training_cases",
    "main", "parse_args", "select_cases", "BASELINE_VERSION_OPS", "BENCHMARKED_OPS", "NUMPY", "TORCH_REFERENCE",
    "Contender", "Gpuconv", "Torch", "contenders_for", "kernel_versions", "device_slug", "machine_info",
    "measure_peaks", "write_reports", "Row", "annotate", "run_row", "MAX_BUFFER_SETS", "CpuTimer", "EventTimer",
    "Stats", "buffer_sets", "summarize", "time_calls", "Workload",
]

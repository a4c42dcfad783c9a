"""Suite-wide settings.

`make test` runs two pytest-xdist workers on a 2-core machine: each worker uses ONE torch
thread. Two threads per worker oversubscribe the cores, and PyTorch's spinning OpenMP threads
then burn several times the CPU for the same work (measured: 7.7x for a training step).
Subprocesses started by tests inherit the environment variables.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

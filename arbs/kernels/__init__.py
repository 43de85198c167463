"""Compute kernels: ``cpu`` (numba) and ``triton_gpu`` (Triton). Kernels never validate input."""

"""Benchmarks of ivshmem_comm against mpi4py (MPICH over shared memory and over TCP).

`python -m benchmarks.pingpong` is the entry point; `_ours` and `_mpi_baseline` are the
processes it starts, `_plan` the schedule and helpers they share.
"""

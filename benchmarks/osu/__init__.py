"""An OSU-complete micro-benchmark suite: ours beside mpi4py over MPICH (shared memory and TCP).

`python -m benchmarks.osu` (console script `ivshmem-osu`); see `benchmarks.osu.cli` for the
command line, `benchmarks.osu.spec` for the tests and their OSU loop structure,
`benchmarks.osu.rank` for the rank program (written once against an `MPI` module object).
"""

"""mpi4py-compatible communicator over ivshmem (issue 5)."""

"""The VM lab: boots real QEMU guests (Debian's kernel, the host root over read-only 9p, a tiny
initramfs) attached to a broker, runs commands and MPI jobs in them. A tool built on the three
packages (`ivshmem_comm`, `host_broker`, `guest_lib`); none of them imports it."""

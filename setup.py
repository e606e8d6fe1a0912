"""Build of the C accelerator of the queue halves; all metadata lives in pyproject.toml.

A failed compile fails the install: the accelerator never silently goes missing. The
pure-Python reference stays selectable at run time with IVSHMEM_COMM_PUREPYTHON=1.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ivshmem_comm._fastpath",
            sources=[
                "ivshmem_comm/_fastpath.c",
                "ivshmem_comm/_typepack.c",
                "ivshmem_comm/_memexport.c",
                "ivshmem_comm/_p2preq.c",
            ],
            depends=[
                "ivshmem_comm/_typepack.h",
                "ivshmem_comm/_memexport.h",
                "ivshmem_comm/_p2preq.h",
            ],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror"],
        )
    ]
)

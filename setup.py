"""Build of the optional C accelerator; all metadata lives in pyproject.toml.

``IVSHMEM_COMM_REQUIRE_FASTPATH=1`` (set by CI) turns a failed build into an error
instead of a pure-Python install, so the accelerator can never silently go missing.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ivshmem_comm._fastpath",
            sources=["ivshmem_comm/_fastpath.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror"],
        )
    ]
)

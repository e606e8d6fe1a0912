# Two entry points for a fresh machine: `make demo` and `make test` (`make check` is the quick
# loop while working; `make test-all`, what CI runs, is `make test` plus the rest). Each creates
# .venv, installs the project with what it needs, and runs. System packages (QEMU, Debian's
# kernel, busybox) come from `make system-deps`, which `.ci/run` calls as root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest exits 5 when a selection collects nothing: every pass below fails then too. Each pass
# ends with its 15 slowest tests, so that CI's log tells where its time goes.
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider --durations=15
ON_C := IVSHMEM_COMM_REQUIRE_FASTPATH=1
ON_PURE := IVSHMEM_COMM_PUREPYTHON=1
# Python writes its bytecode (and pytest its assertion-rewritten test modules) into
# __pycache__ even where the environment says not to (PYTHONDONTWRITEBYTECODE=1, set in some
# containers): else every pytest start-up rewrites all test modules again (5.5 s -> 1.6 s CPU
# a collection) and every rank, and every guest under TCG, compiles the project again.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-all test-rest check lint test-c test-pure-core test-full \
	test-pure-rest system-deps maybe-system-deps clean

$(STAMP): pyproject.toml setup.py ivshmem_comm/_fastpath.c ivshmem_comm/_typepack.c ivshmem_comm/_memexport.c ivshmem_comm/_p2preq.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -c "import ivshmem_comm._fastpath"
	touch $(STAMP)

# The demo boots two QEMU guests when QEMU and a Debian kernel are there or can be
# installed (as root, with apt); otherwise it runs the same exchange between host processes.
demo: maybe-system-deps $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The quick loop: lint and every test that boots no guest, starts no QEMU and is not marked
# slow, on the C fast path, spread over the CPUs (pytest-xdist).
check: lint
	$(ON_C) $(PYTEST) -q -n auto -m "not vm and not qemu and not slow"

# Under 10 minutes on 2 cores: the whole suite on the C fast path but the tests marked `full`
# (mpi4py's suite at 1 and 4 ranks, more 4-rank and mpiexec jobs, all VM tests but two:
# variants of what runs), then the core's quick set again on the pure-Python reference (the
# pure MPI face runs in test_suite_runs). Tests that boot guests, start QEMU or are marked
# `serial` run alone, after the others have run spread over the CPUs (pytest-xdist).
test: maybe-system-deps lint test-c test-pure-core

# Everything (CI): `make test`, then the `full` tests and the rest of the pure-Python path,
# so that the whole suite runs on both paths.
test-all: test test-rest

test-rest: test-full test-pure-rest

test-c: $(STAMP)
	$(ON_C) $(PYTEST) -n auto --dist worksteal -m "not (vm or qemu or serial or full)"
	$(ON_C) $(PYTEST) -m "(vm or qemu or serial) and not full"

test-pure-core: $(STAMP)
	$(ON_PURE) $(PYTEST) -n auto -m "not (vm or qemu or serial or slow or full)" tests/core

# The guest tests marked vm_pair (no timing-bound check, nothing shared) two at a time: a TCG
# guest keeps one CPU busy, so one test's guests leave the other CPU idle.
test-full: $(STAMP)
	$(ON_C) $(PYTEST) -n auto --dist worksteal -m "full and not (vm or qemu or serial)"
	$(ON_C) $(PYTEST) -n 2 -m "full and vm_pair"
	$(ON_C) $(PYTEST) -m "full and (vm or qemu or serial) and not vm_pair"

test-pure-rest: $(STAMP)
	$(ON_PURE) $(PYTEST) -n auto -m "not (vm or qemu or serial or slow or full)" --ignore=tests/core
	$(ON_PURE) $(PYTEST) -n auto --dist worksteal -m "(slow or full) and not (vm or qemu or serial)"
	$(ON_PURE) $(PYTEST) -m "(qemu or serial) and not vm"

maybe-system-deps:
	@if ! command -v qemu-system-x86_64 >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		$(MAKE) system-deps || echo "could not install QEMU: VM parts will be skipped"; fi

system-deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		qemu-system-x86 busybox-static linux-image-amd64 linux-headers-amd64 build-essential kmod \
		systemd libvirt-daemon-system libvirt-clients clang libclang-rt-dev iproute2

clean:
	rm -rf $(VENV) build *.egg-info ivshmem_comm/*.so

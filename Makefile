# Two entry points for a fresh machine: `make demo` and `make test` (`make check` is the quick
# loop while working). Each creates .venv, installs the project with what it needs, and runs.
# System packages (QEMU, Debian's kernel, busybox) come from `make system-deps`, which
# `.ci/run` calls as root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint test-c test-pure system-deps maybe-system-deps clean

$(STAMP): pyproject.toml setup.py ivshmem_comm/_fastpath.c ivshmem_comm/_typepack.c ivshmem_comm/_memexport.c
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
# slow, on the C fast path, spread over the CPUs (pytest-xdist). pytest exits 5 when it
# collects nothing: that fails too.
check: lint
	IVSHMEM_COMM_REQUIRE_FASTPATH=1 $(BIN)/python -m pytest -p no:cacheprovider -q -n auto \
		-m "not vm and not qemu and not slow"

# The whole suite runs twice: on the C fast path, then on the pure-Python reference.
test: maybe-system-deps lint test-c test-pure

test-c: $(STAMP)
	IVSHMEM_COMM_REQUIRE_FASTPATH=1 $(BIN)/python -m pytest -p no:cacheprovider

test-pure: $(STAMP)
	IVSHMEM_COMM_PUREPYTHON=1 $(BIN)/python -m pytest -p no:cacheprovider -m "not vm"

maybe-system-deps:
	@if ! command -v qemu-system-x86_64 >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		$(MAKE) system-deps || echo "could not install QEMU: VM parts will be skipped"; fi

system-deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		qemu-system-x86 busybox-static linux-image-amd64 linux-headers-amd64 build-essential kmod \
		systemd libvirt-daemon-system libvirt-clients clang iproute2

clean:
	rm -rf $(VENV) build *.egg-info ivshmem_comm/*.so

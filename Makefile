# vhostfs: developer and CI entry points.  `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=
# Backend the guest tests and the demo use: vhostfs (default), virtiofsd (QEMU's C
# reference daemon) or a command template with {socket} {shared_dir} placeholders.
VHOSTFS_GUEST_BACKEND ?= vhostfs
export VHOSTFS_GUEST_BACKEND

HOSTSYS_SRC := cffi_build/build_hostsys.py $(wildcard cffi_build/parts/*)

.PHONY: all venv deps test test-unit test-guest test-long fuzz demo bench bench-guest clean distclean
all: test

deps:
	scripts/install-deps.sh

venv: $(VENV)/.installed

# pip's editable install builds vhostfs/_hostsys*.so through setup.py's cffi_modules;
# if no .so at least as new as its sources shows up, build it in place explicitly.
$(VENV)/.installed: pyproject.toml setup.py $(HOSTSYS_SRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	@so=$$(ls -t vhostfs/_hostsys*.so 2>/dev/null | head -1); \
	if [ -z "$$so" ] || [ -n "$$(find $(HOSTSYS_SRC) -newer $$so)" ]; then \
		echo "venv: editable install left no fresh vhostfs/_hostsys*.so; building it in place"; \
		$(PY) cffi_build/build_hostsys.py; \
	fi
	$(PY) -c 'import vhostfs._hostsys'
	touch $@

test: deps venv
	$(PY) -m pytest -q -rs tests $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -q tests -m 'not guest' $(PYTEST_ARGS)

# Longer suites kept out of `make test` (issue 4's stress test at 1,000,000 requests per
# EVENT_IDX setting: about 6 minutes here).
test-long: deps venv
	VHOSTFS_STRESS_REQUESTS=1000000 $(PY) -m pytest -q tests/integration/test_stress.py $(PYTEST_ARGS)

# Longer fuzzing than the bounded run in `make test` (hypothesis + atheris targets for the
# vhost-user decoder, the descriptor-chain walker and the FUSE decoder).
FUZZ_SECONDS ?= 600
FUZZ_EXAMPLES ?= 20000
fuzz: venv
	VHOSTFS_FUZZ_SECONDS=$(FUZZ_SECONDS) VHOSTFS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
	VHOSTFS_FUZZ_CORPUS=$(CURDIR)/.fuzz-corpus $(PY) -m pytest -q tests/fuzz $(PYTEST_ARGS)

test-guest: deps venv
	$(PY) -m pytest -q tests/guest $(PYTEST_ARGS)

demo: deps venv
	scripts/demo.sh $(PY)

# Backend benchmark (issue 7): vhostfs against the Rust and C virtiofsd through the same
# simulated frontend; writes out/bench/results.{md,json,png}.  BENCH_QUICK=1 for a smoke run.
bench: deps venv
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m tests.bench

# The same workloads through fio in booted guests, one per backend (out/bench/guest.md).
bench-guest: deps venv
	command -v fio >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio
	$(PY) -m tests.bench.guest

clean:
	rm -rf build .pytest_cache .hypothesis *.egg-info vhostfs/_hostsys.c vhostfs/_hostsys.o

distclean: clean
	rm -rf $(VENV) vhostfs/_hostsys*.so .fuzz-corpus

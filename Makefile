# kvmfilter: two commands on a fresh machine (see README.md).
#   make run      - set up .venv, install, run the bundled guest
#   make test     - set up .venv, install with test extras, run the test suite
#   make test-min - the unit tests against the oldest cffi, click and structlog
#                   pyproject.toml admits, in .venv-min

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
VENV_MIN ?= .venv-min

GUEST_SRC := $(wildcard kvmfilter/guests/*.S tests/guests/*.S)
GUEST_BIN := $(GUEST_SRC:.S=.bin)
GUEST_INC := $(wildcard kvmfilter/guests/*.inc)
# The guests' shared includes (contract.inc ...), wherever make runs from.
GUEST_INCLUDE := $(dir $(abspath $(firstword $(MAKEFILE_LIST))))kvmfilter/guests

.PHONY: run test unit test-min bench guests venv clean

$(STAMP): pyproject.toml setup.py bin/kvmfilter cstubs/build.py cstubs/kvm_cdef.h cstubs/kvm_source.c
	@./.ci/sysdeps $(PYTHON)
	@test -e $(PY) || $(PYTHON) -m venv $(VENV) \
	  || { echo "kvmfilter: '$(PYTHON) -m venv' failed: install python3-venv" >&2; exit 2; }
	$(PY) -m pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	@# Bytecode now: start-up time matters, and PYTHONDONTWRITEBYTECODE=1 hosts never write it.
	$(PY) -m compileall -q kvmfilter >/dev/null
	@touch $@

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/kvmfilter run

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The same tests, without the real-KVM ones (a laptop without /dev/kvm).
unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: $(STAMP)
	@./.ci/sysdeps --bench $(PYTHON)
	$(VENV)/bin/kvmfilter bench

# The dependency floors, proved: a venv with exactly the minimum cffi, click and
# structlog that pyproject.toml states, kvmfilter built with that cffi (no build
# isolation) and installed (not editable), the unit tests run from outside the
# checkout's import path (bin/pytest, not python -m pytest), then a coloured
# console log on a pseudo-terminal from a real run where /dev/kvm opens.
# test_packaging builds with the newest toolchain in `make test`; skipped here.
FLOORS = $(shell sed -n 's/^dependencies *= *\[\(.*\)\]/\1/p' pyproject.toml \
           | tr -d '" ' | tr ',' '\n' | sed -n 's/^\(cffi\|click\|structlog\)>=/\1==/p')

test-min:
	@./.ci/sysdeps --min $(PYTHON)
	@test "$(words $(FLOORS))" = 3 || { echo "kvmfilter: floors not found in pyproject.toml: '$(FLOORS)'" >&2; exit 2; }
	rm -rf $(VENV_MIN) build
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --quiet 'setuptools>=77' $(FLOORS) \
	  pytest hypothesis prometheus_client qemu.qmp
	$(VENV_MIN)/bin/python -m pip install --quiet --no-build-isolation --no-deps --no-cache-dir .
	rm -rf build
	$(VENV_MIN)/bin/python -m pip check
	@# The floors are what is installed, and kvmfilter is imported from the venv.
	cd / && $(abspath $(VENV_MIN))/bin/python -c 'import sys, importlib.metadata as m, kvmfilter.kvm._kvm as k; \
	  v = lambda s: [int(x) for x in s.split(".")] + [0] * (3 - len(s.split("."))); \
	  want = dict(f.split("==") for f in sys.argv[1:]); got = {p: m.version(p) for p in want}; \
	  print("kvmfilter test-min:", got, "kvmfilter from", k.__file__); \
	  assert all(v(got[p]) == v(w) for p, w in want.items()), (want, got); \
	  assert k.__file__.startswith(sys.prefix), k.__file__' $(FLOORS)
	$(VENV_MIN)/bin/pytest -p no:cacheprovider tests/unit --ignore=tests/unit/test_packaging.py $(PYTEST_ARGS)
	@if $(VENV_MIN)/bin/python -c 'import os; os.close(os.open("/dev/kvm", os.O_RDWR))' 2>/dev/null; then \
	  echo "kvmfilter test-min: a console log on a pty (kvmfilter run)"; \
	  script -qec "$(VENV_MIN)/bin/kvmfilter --log-level info --log-format console run" /dev/null \
	    > $(VENV_MIN)/tty.log 2>&1 || { cat $(VENV_MIN)/tty.log; exit 1; }; \
	  if grep -q -e Traceback -e 'Logging error' $(VENV_MIN)/tty.log \
	     || ! grep -q vm_created $(VENV_MIN)/tty.log; then cat $(VENV_MIN)/tty.log; exit 1; fi; \
	else echo "kvmfilter test-min: /dev/kvm does not open: no pty run (test_logs did one without KVM)"; fi

# Guest images: flat real-mode binaries linked at 0x7C00.
guests: $(GUEST_BIN)

$(GUEST_BIN): $(GUEST_INC)

%.bin: %.S
	gcc -m32 -c -I$(GUEST_INCLUDE) -o $*.o $<
	ld -m elf_i386 -Ttext 0x7c00 -e _start --build-id=none -o $*.elf $*.o
	objcopy -O binary -j .text $*.elf $@
	rm -f $*.o $*.elf

clean:
	rm -rf $(VENV) $(VENV_MIN) build dist *.egg-info kvmfilter/kvm/_kvm*.so

# kvmfilter: two commands on a fresh machine (see README.md).
#   make run   - set up .venv, install, run the bundled guest
#   make test  - set up .venv, install with test extras, run the test suite

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

GUEST_SRC := $(wildcard kvmfilter/guests/*.S tests/guests/*.S)
GUEST_BIN := $(GUEST_SRC:.S=.bin)
GUEST_INC := $(wildcard kvmfilter/guests/*.inc)
# The guests' shared includes (contract.inc ...), wherever make runs from.
GUEST_INCLUDE := $(dir $(abspath $(firstword $(MAKEFILE_LIST))))kvmfilter/guests

.PHONY: run test unit bench guests venv clean

$(STAMP): pyproject.toml setup.py cstubs/build.py cstubs/kvm_cdef.h cstubs/kvm_source.c
	@./.ci/sysdeps
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
	$(VENV)/bin/kvmfilter bench

# Guest images: flat real-mode binaries linked at 0x7C00.
guests: $(GUEST_BIN)

$(GUEST_BIN): $(GUEST_INC)

%.bin: %.S
	gcc -m32 -c -I$(GUEST_INCLUDE) -o $*.o $<
	ld -m elf_i386 -Ttext 0x7c00 -e _start --build-id=none -o $*.elf $*.o
	objcopy -O binary -j .text $*.elf $@
	rm -f $*.o $*.elf

clean:
	rm -rf $(VENV) build dist *.egg-info kvmfilter/kvm/_kvm*.so

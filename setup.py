# cffi's build hook (cffi_modules) is still only reachable through setup.py;
# everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["kvmfilter/_build.py:ffibuilder"])

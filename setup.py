# cffi's build hook (cffi_modules) is still only reachable through setup.py;
# everything else lives in pyproject.toml.  The module is limited-API (cffi
# builds it with Py_LIMITED_API), so the wheel is tagged abi3.
from setuptools import setup

setup(cffi_modules=["cstubs/build.py:ffibuilder"],
      options={"bdist_wheel": {"py_limited_api": "cp310"}})

# The cffi helper is an out-of-line API-mode extension; setuptools needs setup.py to
# learn about cffi_modules (everything else lives in pyproject.toml).
from setuptools import setup

setup(cffi_modules=["cffi_build/build_hostsys.py:ffibuilder"])

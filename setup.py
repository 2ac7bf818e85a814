"""Build script: the compiled ops library `tta._C` is added by the kernels work (csrc/)."""

from setuptools import setup

setup()

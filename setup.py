"""Build hook for the optional C copy engine; everything else is in pyproject.toml.

`kvbm_shm.kernels._batch_copy` is optional: if it cannot be compiled, the package still installs
and `kernels.cpu_copy` falls back to a Python loop of memmoves (about half the bandwidth).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvbm_shm.kernels._batch_copy", ["kvbm_shm/kernels/_batch_copy.c"],
                             extra_compile_args=["-O3"], optional=True)])

"""Build hook for the optional C extensions; everything else is in pyproject.toml.

Both are optional: if one cannot be compiled, the package still installs and uses its pure-Python
path with the same results.
- `kvbm_shm.kernels._batch_copy`: the copy engine; without it `kernels.cpu_copy` copies through a
  Python loop of memmoves (about half the bandwidth).
- `kvbm_shm._hashing`: chained block hashes and the shared hash index (`hashing`, `hash_index`),
  with the vendored single-header xxHash (`kvbm_shm/_vendor/xxhash`, BSD 2-Clause) inlined.
"""

from setuptools import Extension, setup

XXHASH = "kvbm_shm/_vendor/xxhash"

setup(ext_modules=[
    Extension("kvbm_shm.kernels._batch_copy", ["kvbm_shm/kernels/_batch_copy.c"], extra_compile_args=["-O3"],
              optional=True),
    Extension("kvbm_shm._hashing", ["kvbm_shm/_hashing.c"], depends=[f"{XXHASH}/xxhash.h", f"{XXHASH}/LICENSE"],
              extra_compile_args=["-O3"], optional=True),
])

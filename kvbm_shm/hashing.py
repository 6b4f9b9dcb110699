"""Block identity: token ids -> chained sequence hashes.

A sequence is cut into blocks of `page_size` tokens; only full blocks get a hash. The hash of
block i covers every token before it through the chain

    h0 = H(salt || tokens_0),   h_i = H(h_(i-1) || tokens_i)

where H is xxh3-128 (16 bytes, big-endian digest) and tokens are little-endian uint32. The salt
is H of the request's cache salt and LoRA name, so requests that must not share KV never match.
The result is stable across processes, hosts and releases: `tests/test_hashing.py` pins it with
fixed vectors.

The chain is computed by one call into `kvbm_shm._hashing` (C, xxHash inlined) when it is built:
a list or tuple of ints (what vLLM and SGLang hold) is converted there (every id checked, the
tail too) before the chain is hashed, and a numpy array is passed as its little-endian uint32 bytes. Without the extension, a Python loop over
`xxhash` gives the same hashes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xxhash

try:
    from . import _hashing as _c
except ImportError:  # built without a C compiler: the same hashes, from a Python loop
    _c = None

HASH_BYTES = 16


def salt_for(cache_salt: str | None = None, lora_name: str | None = None) -> bytes:
    """The 16-byte chain seed for a request's cache salt and LoRA adapter name."""
    text = f"kvbm-shm/v1\x00{cache_salt or ''}\x00{lora_name or ''}".encode()
    return xxhash.xxh3_128_digest(text)


def sequence_hashes(
    tokens: Sequence[int] | np.ndarray,
    page_size: int,
    salt: bytes | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """Hashes of every full block of `tokens`.

    `parent` continues a chain (the hash of the block before `tokens[0]`); otherwise the chain
    starts from `salt` (default: `salt_for()`).
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    prev = parent if parent is not None else (salt if salt is not None else salt_for())
    if _c is not None and type(tokens) in (list, tuple):
        try:
            return _c.chain(tokens, page_size, prev)
        except TypeError:  # items that are not ints: numpy converts them below, as without C
            pass
    arr = np.asarray(tokens, dtype="<u4")
    if arr.ndim != 1:
        raise ValueError("tokens must be one-dimensional")
    if _c is not None:
        return _c.chain(np.ascontiguousarray(arr), page_size, prev)
    step = page_size * 4
    data = arr[:len(arr) // page_size * page_size].tobytes()  # one conversion; slicing bytes is cheap
    digest = xxhash.xxh3_128_digest
    out = []
    for offset in range(0, len(data), step):
        prev = digest(prev + data[offset:offset + step])
        out.append(prev)
    return out

"""Block identity: fixed vectors pin the hash chain across releases and hosts."""

import shutil
import sysconfig

import numpy as np
import pytest
import xxhash

from kvbm_shm import hashing
from kvbm_shm.hashing import salt_for, sequence_hashes

VECTORS = {
    "salt_default": "1a9e01619b0996bb72a3146f985eb6d6",
    "salt_s_l": "299b6aeee0affe29366ed7fbf5dfdc5f",
    "chain_0_8_page4": ["7004c759445f199ec2449741dffc8cfa", "48ee74fc3ea37837cd4d29572b6e6479"],
    "chain_0_8_page4_salt_abc": ["02c5e16c868a84cca991becea48a12c3", "69de347db321e4c7f997e44fe9ec01d4"],
}


@pytest.fixture(params=["c", "python"])
def path(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(hashing, "_c", None)
    elif hashing._c is None:
        pytest.skip("kvbm_shm._hashing is not built")
    return request.param


def test_fixed_vectors(path):
    assert salt_for().hex() == VECTORS["salt_default"]
    assert salt_for("s", "l").hex() == VECTORS["salt_s_l"]
    assert [h.hex() for h in sequence_hashes(range(8), 4)] == VECTORS["chain_0_8_page4"]
    assert [h.hex() for h in sequence_hashes(range(8), 4, salt=salt_for("abc"))] == VECTORS["chain_0_8_page4_salt_abc"]


def test_definition_is_xxh3_128_over_le_uint32_chain(path):
    salt = salt_for("x")
    tokens = [1, 2, 70000, 4]
    h0 = xxhash.xxh3_128_digest(salt + np.array(tokens[:2], "<u4").tobytes())
    h1 = xxhash.xxh3_128_digest(h0 + np.array(tokens[2:], "<u4").tobytes())
    assert sequence_hashes(tokens, 2, salt=salt) == [h0, h1]


def test_only_full_blocks_and_prefix_property(path):
    tokens = list(range(100, 150))
    full = sequence_hashes(tokens, 16)
    assert len(full) == 3  # 50 tokens: 3 full blocks, the tail is not hashed
    assert sequence_hashes(tokens[:32], 16) == full[:2]
    assert sequence_hashes(tokens[16:48], 16, parent=full[0]) == full[1:]


def test_salt_and_lora_isolate():
    tokens = list(range(32))
    plain = sequence_hashes(tokens, 16)
    assert sequence_hashes(tokens, 16, salt=salt_for("tenant-a")) != plain
    assert sequence_hashes(tokens, 16, salt=salt_for(None, "lora1")) != plain
    assert sequence_hashes(tokens, 16, salt=salt_for("a", "")) != sequence_hashes(tokens, 16, salt=salt_for("", "a"))


def test_bad_arguments(path):
    with pytest.raises(ValueError):
        sequence_hashes([1, 2], 0)
    with pytest.raises(ValueError):
        sequence_hashes([[1, 2]], 1)


def test_c_path_is_built_where_a_compiler_exists():
    if shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) is None:
        pytest.skip("no C compiler: the pure-Python path is the one in use")
    assert hashing._c is not None, "kvbm_shm._hashing is not built: run `pip install -e .` or setup.py build_ext"


def _python_chain(tokens, page_size, salt=None, parent=None):
    c, hashing._c = hashing._c, None
    try:
        return sequence_hashes(tokens, page_size, salt=salt, parent=parent)
    finally:
        hashing._c = c


@pytest.mark.parametrize("seed", range(5))
def test_c_path_equals_python_path_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    page = int(rng.integers(1, 40))
    tokens = rng.integers(0, 2**32, int(rng.integers(0, 40 * page)), dtype=np.uint64)
    as_list = [int(t) for t in tokens]
    salt = salt_for(f"s{seed}")
    want = _python_chain(as_list, page, salt=salt)
    assert len(want) == len(as_list) // page
    strided = np.stack([tokens, tokens], axis=1).astype(np.uint32)[:, 0]  # a view that is not contiguous
    for form in (as_list, tuple(as_list), tokens.astype(np.uint32), tokens.astype(np.int64), strided):
        assert sequence_hashes(form, page, salt=salt) == want
    if want:
        assert sequence_hashes(as_list[page:], page, parent=want[0]) == want[1:]
        odd_salt = bytes(range(23))  # a seed of another length starts the chain the same way in both paths
        assert sequence_hashes(as_list, page, salt=odd_salt) == _python_chain(as_list, page, salt=odd_salt)


def test_c_path_refuses_what_numpy_refuses():
    for bad in ([1, -1], [2**32], [0, 2**70]):
        with pytest.raises(OverflowError):
            sequence_hashes(bad, 1)
        with pytest.raises(OverflowError):
            _python_chain(bad, 1)
    with pytest.raises(OverflowError):  # the unhashed tail is checked too
        sequence_hashes([1, 2, -3], 2)
    mixed = [1, np.int64(2), True, 4]  # items that are not ints take numpy's conversion
    assert sequence_hashes(mixed, 2) == _python_chain(mixed, 2) == sequence_hashes([1, 2, 1, 4], 2)

"""Block identity: fixed vectors pin the hash chain across releases and hosts."""

import numpy as np
import pytest
import xxhash

from kvbm_shm.hashing import salt_for, sequence_hashes

VECTORS = {
    "salt_default": "1a9e01619b0996bb72a3146f985eb6d6",
    "salt_s_l": "299b6aeee0affe29366ed7fbf5dfdc5f",
    "chain_0_8_page4": ["7004c759445f199ec2449741dffc8cfa", "48ee74fc3ea37837cd4d29572b6e6479"],
    "chain_0_8_page4_salt_abc": ["02c5e16c868a84cca991becea48a12c3", "69de347db321e4c7f997e44fe9ec01d4"],
}


def test_fixed_vectors():
    assert salt_for().hex() == VECTORS["salt_default"]
    assert salt_for("s", "l").hex() == VECTORS["salt_s_l"]
    assert [h.hex() for h in sequence_hashes(range(8), 4)] == VECTORS["chain_0_8_page4"]
    assert [h.hex() for h in sequence_hashes(range(8), 4, salt=salt_for("abc"))] == VECTORS["chain_0_8_page4_salt_abc"]


def test_definition_is_xxh3_128_over_le_uint32_chain():
    salt = salt_for("x")
    tokens = [1, 2, 70000, 4]
    h0 = xxhash.xxh3_128_digest(salt + np.array(tokens[:2], "<u4").tobytes())
    h1 = xxhash.xxh3_128_digest(h0 + np.array(tokens[2:], "<u4").tobytes())
    assert sequence_hashes(tokens, 2, salt=salt) == [h0, h1]


def test_only_full_blocks_and_prefix_property():
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


def test_bad_arguments():
    with pytest.raises(ValueError):
        sequence_hashes([1, 2], 0)
    with pytest.raises(ValueError):
        sequence_hashes([[1, 2]], 1)

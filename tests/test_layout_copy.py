"""Engine layouts -> chunk tables -> gather/scatter through the CPU copy engine.

Every layout the issue names is exercised: one tensor per layer with K/V interleaved in the last
axis (vLLM CPU), K and V as separate tensors, K/V split on an outer axis (CUDA flash-attn) and
one tensor for all layers. A gather into contiguous blocks followed by a scatter into other
device blocks must reproduce the source blocks exactly.
"""

import shutil

import numpy as np
import pytest
import torch

from kvbm_shm.kernels import cpu_copy
from kvbm_shm.layout import EngineLayout, KvLayout, Namespace

NB, L, H, P, D = 12, 3, 2, 16, 32  # device blocks, layers, kv heads, page size, head dim


def layouts():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    yield "vllm_cpu_interleaved", [r(NB, H, P, 2 * D) for _ in range(L)], 0
    yield "separate_k_v", [r(NB, P, H, D) for _ in range(2 * L)], 0
    yield "outer_split_kv", [r(2, NB, P, H, D) for _ in range(L)], 1
    yield "all_layers_one_tensor", [r(L, 2, NB, P, H * D)], 2
    yield "block_major_all_layers", [r(NB, L, 2, P, H * D)], 0


@pytest.mark.parametrize("name,tensors,axis", list(layouts()), ids=[x[0] for x in layouts()])
def test_gather_scatter_roundtrip(name, tensors, axis):
    layout = EngineLayout.of(tensors, axis)
    kv = KvLayout(L, 2, P, H * D, "float32")
    Namespace("m", kv, layout).validate()  # every layout holds the same bytes per block
    table = layout.bind(tensors)
    assert table.block_bytes == kv.block_bytes
    src_ids = [7, 2, 9, 3]
    pool = np.zeros((len(src_ids), table.block_bytes + 100), np.uint8)  # padded rows: strided blocks
    addrs = pool.ctypes.data + np.arange(len(src_ids), dtype=np.uint64) * np.uint64(pool.strides[0])
    stored = cpu_copy.gather(table, src_ids, addrs)
    assert stored.tolist() == [cpu_copy.checksum(row[:table.block_bytes]) for row in pool]
    dst = [torch.zeros_like(t) for t in tensors]
    dst_ids = [0, 1, 5, 11]
    assert cpu_copy.scatter(layout.bind(dst), dst_ids, addrs).tolist() == stored.tolist()
    for s, d in zip(tensors, dst):
        for i, j in zip(src_ids, dst_ids):
            assert torch.equal(s.select(axis, i), d.select(axis, j))
    untouched = [b for b in range(NB) if b not in dst_ids]
    assert all(d.select(axis, b).abs().sum() == 0 for d in dst for b in untouched)


def test_contiguous_runs_are_merged_within_a_block():
    tensors = [torch.zeros(NB, 4, 8) for _ in range(2)]
    table = EngineLayout.of(tensors).bind(tensors)
    dev, g2, size, starts = cpu_copy.copy_plan(table, [0, 1, 2], [0, 10_000, 20_000])
    assert len(size) == 6 and starts.tolist() == [0, 2, 4, 6]  # separate tensors never merge
    outer = [torch.zeros(2, NB, 4, 8)]  # K and V of one block sit apart on the outer axis
    t2 = EngineLayout.of(outer, 1).bind(outer)
    assert cpu_copy.copy_plan(t2, [3], [0])[2].tolist() == [128, 128]
    block_major = [torch.zeros(NB, 2, 4, 8)]  # one contiguous chunk per block
    t1 = EngineLayout.of(block_major).bind(block_major)
    dev, g2, size, starts = cpu_copy.copy_plan(t1, [3, 4], [0, t1.block_bytes])
    assert size.tolist() == [256, 256] and starts.tolist() == [0, 1, 2]  # never across blocks


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_c_copy_engine_is_built_where_a_compiler_exists():
    # without it, the C-vs-reference comparison below would compare the reference with itself
    assert cpu_copy._c is not None, "kvbm_shm.kernels._batch_copy was not built (pip install -e . builds it)"


def test_checksum_detects_changes_and_moves():
    rng = np.random.default_rng(1)
    block = rng.integers(0, 256, 8192, dtype=np.uint8)
    base = cpu_copy.checksum(block)
    assert base == cpu_copy._checksum_numpy(block)  # C and the reference agree
    flipped = block.copy()
    flipped[4000] ^= 1
    swapped = block.copy()
    swapped[0:16], swapped[16:32] = block[16:32], block[0:16]
    sums = {base, cpu_copy.checksum(flipped), cpu_copy.checksum(swapped), cpu_copy.checksum(block[:-1])}
    assert len(sums) == 4


def test_layout_mismatch_is_refused():
    tensors = [torch.zeros(NB, H, P, 2 * D) for _ in range(L)]
    layout = EngineLayout.of(tensors)
    with pytest.raises(ValueError, match="does not match"):
        layout.bind([torch.zeros(NB, H, P, D) for _ in range(L)])
    with pytest.raises(ValueError, match="tensors"):
        layout.bind(tensors[:-1])
    with pytest.raises(ValueError, match="contiguous"):
        layout.bind([t.transpose(2, 3).contiguous().transpose(2, 3) for t in tensors])
    with pytest.raises(ValueError, match="holds"):
        layout.bind([tensors[0], torch.zeros(NB + 1, H, P, 2 * D), tensors[2]])
    with pytest.raises(ValueError, match="device block ids"):
        cpu_copy.gather(layout.bind(tensors), [NB], np.zeros(1, np.uint64))


def test_namespace_rejects_inconsistent_geometry():
    tensors = [torch.zeros(NB, H, P, 2 * D) for _ in range(L)]
    ns = Namespace("m", KvLayout(L, 2, P, H * D, "float16"), EngineLayout.of(tensors))
    with pytest.raises(ValueError, match="bytes per block"):
        ns.validate()
    assert Namespace("m", KvLayout(L, 2, P, H * D, "float32"), EngineLayout.of(tensors), 0, 2).fingerprint != \
        Namespace("m", KvLayout(L, 2, P, H * D, "float32"), EngineLayout.of(tensors), 1, 2).fingerprint


def test_large_batches_split_over_threads_give_the_same_bytes_and_sums():
    tensors = [torch.randn(64, 2, 16, 1024, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    table = EngineLayout.of(tensors).bind(tensors)  # 256 KiB blocks, 64 of them: 16 MiB
    ids = list(range(63, -1, -1))
    pools = [np.zeros((64, table.block_bytes), np.uint8) for _ in range(2)]
    sums = []
    for pool, threads in zip(pools, (1, 3)):
        addrs = pool.ctypes.data + np.arange(64, dtype=np.uint64) * np.uint64(table.block_bytes)
        sums.append(cpu_copy.gather(table, ids, addrs, threads).tolist())
    assert sums[0] == sums[1] and np.array_equal(pools[0], pools[1])
    assert sums[0][5] == cpu_copy.checksum(pools[0][5])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_checksums_of_many_blocks_match_one_by_one(threads):
    rng = np.random.default_rng(5)
    blocks = [rng.integers(0, 256, 1 << 20, dtype=np.uint8) for _ in range(19)]  # 19 MiB: split when threads > 1
    assert cpu_copy.checksums(blocks, threads) == [cpu_copy.checksum(b) for b in blocks]
    assert cpu_copy.checksums(blocks[:1], threads) == [cpu_copy.checksum(blocks[0])]
    assert cpu_copy.checksums([], threads) == []

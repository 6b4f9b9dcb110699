"""The remote index alone: what KV events and resyncs make it hold, its bound, and dropping a node."""

from __future__ import annotations

from kvbm_shm import protocol as p
from kvbm_shm.cluster.index import RemoteIndex

FP = "fp"
H = [bytes([i]) * 16 for i in range(10)]


def test_events_add_and_remove_g2_blocks_only():
    index = RemoteIndex(100)
    index.apply("a", [p.BlockStored(pool_id=0, fingerprint=FP, hashes=H[:4], tier=p.Tier.CPU),
                      p.BlockStored(pool_id=0, fingerprint=FP, hashes=H[4:6], tier=p.Tier.DISK)])
    assert (len(index), index.run_on(FP, H)) == (4, ("a", 4))
    index.apply("a", [p.BlockRemoved(pool_id=0, fingerprint=FP, hashes=[H[2]], tier=p.Tier.CPU)])
    assert index.run_on(FP, H) == ("a", 2)
    assert index.run_on("other", H) == ("", 0)
    index.apply("a", [p.PoolCleared(pool_id=0, fingerprint=FP)])
    assert (len(index), index.sizes()) == (0, {"a": 0})


def test_the_longest_run_wins_and_dropping_a_node_forgets_only_its_blocks():
    index = RemoteIndex(100)
    index.add("a", FP, H[:3], p.Tier.CPU)
    index.add("b", FP, H[:6], p.Tier.CPU)
    assert index.run_on(FP, H) == ("b", 6)
    assert index.drop_node("b") == 6
    assert (index.run_on(FP, H), len(index)) == (("a", 3), 3)


def test_the_index_is_bounded_and_drops_the_oldest():
    index = RemoteIndex(4)
    index.add("a", FP, H[:6], p.Tier.CPU)
    assert (len(index), index.dropped, index.sizes()) == (4, 2, {"a": 4})
    assert index.run_on(FP, H) == ("", 0)  # the first two went
    assert index.run_on(FP, H[2:]) == ("a", 4)

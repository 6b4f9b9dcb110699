"""The CPU stand-in of a GPU engine's KV cache: "device" tensors in a POSIX shm segment.

Without a GPU an engine's KV tensors live in a shm segment and are shared by name instead of by
CUDA IPC handle, so that worker-driven transfers run on CPU through the same protocol, planner
and workers as on a GPU.

- `StandInKv.create(instance, shapes, dtype)` (engine process): one segment holding all the
  tensors, each 4 KiB aligned; `tensors` are torch tensors over the mapping. `locate(tensor)`
  gives the `(segment, offset)` a peer maps. `close()` unmaps and unlinks: the engine that
  creates a segment owns its unlink.
- `reap_dead(instance)` (coordinator): unlink the segments whose creating process is gone, so an
  engine that crashed leaves nothing in /dev/shm.

Segment names are `kvbm-<instance>-dev-<pid>-<n>` (`names.standin_name`): the instance, the
creator's pid and a counter.
Peers attach by name and only close. Stand-ins follow the ownership rules of every segment
(`shm`): created 0600, attached only when they are our uid's, and `reap_dead` leaves another
user's files alone.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from typing import Sequence

from ..errors import ForeignError
from ..names import parse_standin_name, standin_name
from ..names import standin_prefix as segment_prefix  # the name the coordinator's device tier reads here
from ..runtime import pid_alive
from ..shm import PAGE, Segment, list_segments, round_up, unlink

log = logging.getLogger(__name__)

_counter = itertools.count()
_live: dict[str, "StandInKv"] = {}  # this process's stand-ins, by segment name


class StandInKv:
    """Engine KV tensors in one shm segment, owned (unlinked) by the process that created them."""

    def __init__(self, segment: Segment, tensors: list):
        self.segment = segment
        self.tensors = tensors
        self._base = segment.address()

    @classmethod
    def create(cls, instance: str, shapes: Sequence[Sequence[int]], dtype=None) -> "StandInKv":
        """Zero-filled tensors of `shapes` (torch `dtype`, default float32) in a new segment."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        item = torch.empty(0, dtype=dtype).element_size()
        offsets, size = [], 0
        for shape in shapes:
            offsets.append(size)
            size = round_up(size + math.prod(shape) * item)
        name = standin_name(instance, os.getpid(), next(_counter))
        segment = Segment.create(name, max(size, PAGE))
        try:
            tensors = [torch.frombuffer(segment.buf, dtype=dtype, count=math.prod(shape), offset=off).view(*shape)
                       for shape, off in zip(shapes, offsets)]
        except BaseException:
            segment.close()
            unlink(name)
            raise
        kv = cls(segment, tensors)
        _live[name] = kv
        log.debug("stand-in KV %s: %d tensors, %d bytes", name, len(tensors), size)
        return kv

    @property
    def name(self) -> str:
        return self.segment.name

    def contains(self, address: int, nbytes: int) -> bool:
        return self._base <= address and address + nbytes <= self._base + self.segment.size

    def offset_of(self, address: int) -> int:
        return address - self._base

    def close(self) -> None:
        """Drop the tensors, unmap and unlink (tensors handed out must not be used afterwards)."""
        _live.pop(self.name, None)
        self.tensors = []
        self.segment.close()
        unlink(self.name)


def locate(address: int, nbytes: int) -> tuple[str, int] | None:
    """(segment name, offset) of memory inside one of this process's stand-ins, else None."""
    for kv in _live.values():
        if kv.contains(address, nbytes):
            return kv.name, kv.offset_of(address)
    return None


def reap_dead(instance: str) -> list[str]:
    """Unlink the stand-in segments of `instance` whose creating process is not alive."""
    removed = []
    for name in list_segments(segment_prefix(instance)):
        parsed = parse_standin_name(name)
        if parsed is None or parsed[0] != instance or pid_alive(parsed[1]):
            continue
        try:
            if unlink(name):
                removed.append(name)
        except ForeignError as e:
            log.debug("not removing a stand-in segment that is not ours: %s", e)
    if removed:
        log.info("removed %d stand-in segment(s) of dead engines: %s", len(removed), ", ".join(removed))
    return removed

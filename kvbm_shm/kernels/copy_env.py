"""Process environment for streaming KV copies (transfer workers, the benchmark).

glibc's memmove switches to non-temporal stores only above `glibc.cpu.x86_non_temporal_threshold`
(by default about three quarters of the shared cache: 190 MB on the development host), so a copy
made of 64 KiB chunks goes through the cache and reads every destination line before writing it;
measured on the development host, a scattered 1 GiB gather ran at ~0.4 of one 1 GiB memmove, and
at ~0.6 with the threshold at 32 KiB. A process whose copies stream (nothing reads the
destination soon) is therefore started with that threshold. glibc reads tunables at start-up
only, so this is an environment for a new process, not a setting.

- `streaming_copy_env(base)`: `base` with GLIBC_TUNABLES extended (a value already there wins).
"""

from __future__ import annotations

from typing import Mapping

NON_TEMPORAL_THRESHOLD = "glibc.cpu.x86_non_temporal_threshold"
STREAMING_THRESHOLD_BYTES = 32 << 10


def streaming_copy_env(base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    tunables = env.get("GLIBC_TUNABLES", "")
    if NON_TEMPORAL_THRESHOLD not in tunables:
        setting = f"{NON_TEMPORAL_THRESHOLD}={STREAMING_THRESHOLD_BYTES:#x}"
        env["GLIBC_TUNABLES"] = f"{tunables}:{setting}" if tunables else setting
    return env

"""Page-locking host memory for the GPU: cuMemHostRegister on this process's own mapping.

`cuMemHostRegister` is per process and per mapping, so every process that copies between a GPU
and a G2 segment registers its own mapping of that segment, and unregisters before unmapping.
Flags: PORTABLE (every context of the process sees it pinned) | DEVICEMAP (kernels can address
it; with unified addressing the device address equals the host address, which
`device_offset` confirms rather than assumes).

cuMemHostRegister acts on the calling thread's current context, so registering makes GPU
`ordinal`'s primary context current first (PORTABLE then extends the pinning to every context).

- `HostRegistration(address, size, ordinal)`: registers `[address, address + size)`;
  `device_offset` translates host addresses inside it (device address = host address + offset);
  `close()` unregisters (idempotent).
"""

from __future__ import annotations

import logging

from .cuda_driver import check, driver, use_device

log = logging.getLogger(__name__)


class HostRegistration:
    def __init__(self, address: int, size: int, ordinal: int):
        drv = driver()
        use_device(ordinal)
        self.ordinal = ordinal
        flags = drv.CU_MEMHOSTREGISTER_PORTABLE | drv.CU_MEMHOSTREGISTER_DEVICEMAP
        check(drv.cuMemHostRegister(address, size, flags), "cuMemHostRegister")
        self.address = address
        self.size = size
        try:
            self._device_base = int(check(drv.cuMemHostGetDevicePointer(address, 0), "cuMemHostGetDevicePointer"))
        except BaseException:
            drv.cuMemHostUnregister(address)
            raise
        self._open = True
        log.debug("page-locked %d bytes at %#x", size, address)

    @property
    def device_offset(self) -> int:
        """device address - host address, for translating many addresses at once."""
        return self._device_base - self.address

    def close(self) -> None:
        if self._open:
            self._open = False
            use_device(self.ordinal)
            check(driver().cuMemHostUnregister(self.address), "cuMemHostUnregister")

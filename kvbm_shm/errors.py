"""Typed errors of kvbm-shm and the error codes they share with the wire protocol.

Every error a caller can cause or observe is a `KvbmError` subclass carrying an `ErrorCode`.
The coordinator answers a bad request with an error reply holding that code; the client library
turns the reply back into the same exception class, so both sides speak one vocabulary.
`retryable` says whether the same request may succeed later unchanged.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Error codes carried in error replies. Values are part of the wire protocol: never reuse one."""

    BAD_FRAME = 1  # not [version][body][buffers...], or the body does not decode
    BAD_VERSION = 2  # the version frame names a protocol this coordinator does not speak
    FRAME_TOO_LARGE = 3
    UNKNOWN_OP = 4
    BAD_REQUEST = 5  # decodes, but the values are invalid (wrong lengths, negative counts, ...)
    UNKNOWN_LEASE = 6  # the client id is not (or no longer) known: say hello again
    UNKNOWN_POOL = 7
    UNKNOWN_BLOCK = 8
    NOT_OWNER = 9  # the block is not pending under the caller's lease
    NOT_PINNED = 10  # the caller holds no pin on the block
    BUDGET_EXHAUSTED = 11  # the CPU cache budget cannot hold another pool
    SHM_FULL = 12  # /dev/shm has no room for the segment
    LAYOUT_MISMATCH = 13  # a namespace is already registered with another block format
    TIMEOUT = 14
    UNAVAILABLE = 15  # the coordinator is not running or not reachable
    INTERNAL = 16
    CORRUPT = 17  # bytes or a header failed verification
    ALREADY_RUNNING = 18  # another live coordinator holds the instance
    WORKER_FAILED = 19  # a worker process died or failed the job; the blocks were not moved
    UNKNOWN_DEVICE = 20  # the device (G1) registration is not, or no longer, known
    DEVICE_FAILED = 21  # a CUDA call, or exporting or importing a tensor across processes, failed
    CAPACITY = 22  # a bound on what a peer or the instance may hold (leases, pools, devices) is reached
    FOREIGN = 23  # a file, directory or peer is not ours to trust (another user's, a link, loose mode)


_RETRYABLE = {ErrorCode.UNKNOWN_LEASE, ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE, ErrorCode.WORKER_FAILED}


class KvbmError(Exception):
    """Base class: an error with a protocol code and a human-readable message."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)

    @property
    def retryable(self) -> bool:
        return self.code in _RETRYABLE


class ProtocolError(KvbmError):
    """The peer sent something that is not a valid message of our protocol."""

    code = ErrorCode.BAD_FRAME


class UnknownOpError(ProtocolError):
    """The peer does not know the request's op (it speaks an older protocol, or the op is made up).
    Recognise it by this type or its code, never by the message."""

    code = ErrorCode.UNKNOWN_OP


class RequestError(KvbmError):
    """A well-formed request that the coordinator refused (unknown ids, wrong owner, ...)."""

    code = ErrorCode.BAD_REQUEST


class LeaseError(KvbmError):
    """The caller's lease is unknown, e.g. it expired or the coordinator restarted."""

    code = ErrorCode.UNKNOWN_LEASE


class CapacityError(KvbmError):
    """No room: the CPU cache budget or /dev/shm cannot hold what was asked, or a bound on
    leases, pools or devices is reached (CAPACITY)."""

    code = ErrorCode.BUDGET_EXHAUSTED


class CoordinatorUnavailable(KvbmError):
    """No coordinator answers at the endpoint (not started, dead, or the call timed out)."""

    code = ErrorCode.UNAVAILABLE


class CorruptionError(KvbmError):
    """Bytes or metadata failed verification; they are never served."""

    code = ErrorCode.CORRUPT


class DeviceError(KvbmError):
    """A GPU operation failed: no usable GPU or driver, a CUDA error, or a tensor that cannot be
    shared across processes the way it was asked (the message says which way it needs)."""

    code = ErrorCode.DEVICE_FAILED


class ForeignError(KvbmError):
    """A segment, runtime directory, runtime file or coordinator that is not ours to trust: another
    user's, reached through a symbolic link, open to others, or not the process the runtime file
    names. It is left alone (never used, never removed); the message names it and its owner."""

    code = ErrorCode.FOREIGN


class ConfigError(KvbmError):
    """A configuration value is missing, malformed, or the environment cannot satisfy it."""

    code = ErrorCode.BAD_REQUEST


_BY_CODE: dict[ErrorCode, type[KvbmError]] = {
    ErrorCode.BAD_FRAME: ProtocolError,
    ErrorCode.BAD_VERSION: ProtocolError,
    ErrorCode.FRAME_TOO_LARGE: ProtocolError,
    ErrorCode.UNKNOWN_OP: UnknownOpError,
    ErrorCode.UNKNOWN_LEASE: LeaseError,
    ErrorCode.BUDGET_EXHAUSTED: CapacityError,
    ErrorCode.SHM_FULL: CapacityError,
    ErrorCode.CAPACITY: CapacityError,
    ErrorCode.TIMEOUT: CoordinatorUnavailable,
    ErrorCode.UNAVAILABLE: CoordinatorUnavailable,
    ErrorCode.CORRUPT: CorruptionError,
    ErrorCode.DEVICE_FAILED: DeviceError,
    ErrorCode.FOREIGN: ForeignError,
}


def error_from_code(code: int, message: str) -> KvbmError:
    """Rebuild the exception for an error reply (client side)."""
    try:
        ecode = ErrorCode(code)
    except ValueError:
        return KvbmError(f"unknown error code {code}: {message}")
    return _BY_CODE.get(ecode, RequestError)(message, ecode)

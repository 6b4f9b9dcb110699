"""The wire protocol between clients and the coordinator, and the KV event stream.

Frames of a request (client DEALER -> coordinator ROUTER):

    [VERSION][body][raw buffer]*

`VERSION` is `b"kvbm/<PROTOCOL_VERSION>"`; `body` is a msgspec-msgpack encoded `Request`, a
tagged union encoded as an array `[op, req, fields...]`. A reply has the same frames, with `body` a `Reply` tagged on
`kind`; every reply carries the `req` id of its request, and a failure is an `ErrorReply`
(code from `errors.ErrorCode`, message, retryable). KV events go out on the PUB socket as
`[b"kv"][VERSION][EventBatch]`, each batch numbered by `seq` (no gaps while the coordinator
lives; a subscriber that sees a gap or a new `instance_id` has missed events).

Nothing that crosses a process boundary is pickled. Field order is part of the protocol; new
fields go last with a default, and incompatible changes bump `PROTOCOL_VERSION`.

Leases: `Hello` opens one and its reply carries `lease`, a random token that identifies it; every
request that acts on a lease carries that token (never a bare client id, which is only a display
name and restarts with the coordinator). A token the coordinator does not know (ended, or issued
by an earlier coordinator start) gets `UNKNOWN_LEASE`. Strings and lists that the coordinator keeps
(names, reasons, device tensors) have a maximum length checked while decoding.

Block ids in `AllocateReply.block_ids` are pool block indices >= 0, or one of the sentinels
`ALREADY_STORED` (the hash is registered: nothing to write), `IN_FLIGHT` (another client is
writing it) and `NO_ROOM` (nothing could be evicted to make room).
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec

from .errors import ErrorCode, ProtocolError
from .layout import EngineLayout, Namespace

PROTOCOL_VERSION = 2
VERSION_FRAME = b"kvbm/%d" % PROTOCOL_VERSION
EVENTS_TOPIC = b"kv"

# Value constraints checked while decoding (in C), so handlers never re-check them by hand.
SequenceHash = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
Checksum = Annotated[int, msgspec.Meta(ge=0)]  # a block checksum (msgpack caps it at 2**64 - 1)
Priority = Annotated[int, msgspec.Meta(ge=-2**15, lt=2**15)]  # eviction priority (int16 in the table)
LEASE_TOKEN_BYTES = 16
LeaseToken = Annotated[bytes, msgspec.Meta(min_length=LEASE_TOKEN_BYTES, max_length=LEASE_TOKEN_BYTES)]
MAX_NAME_BYTES = 256  # client names, reasons: kept (or logged) by the coordinator
ShortStr = Annotated[str, msgspec.Meta(max_length=MAX_NAME_BYTES)]
ShortBytes = Annotated[bytes, msgspec.Meta(max_length=MAX_NAME_BYTES)]
MAX_INVALIDATE_BLOCKS = 64  # the coordinator re-reads every listed block's bytes
MAX_DEVICE_TENSORS = 4096  # tensors of one registered device (two per layer is typical)
MAX_TENSOR_DIMS = 16

ALREADY_STORED = -1
IN_FLIGHT = -2
NO_ROOM = -3


class Tier:
    """Where a block's bytes are. Values are carried in replies and events."""

    DEVICE = 1  # G1: an engine's own KV tensors
    CPU = 2  # G2: a shm pool block
    DISK = 3  # G3: a block file
    CLUSTER = 4  # G4: another node's pool, read over the network into a G2 block


# ---------------------------------------------------------------- requests


class _Request(msgspec.Struct, tag_field="op", array_like=True):
    req: int


class Hello(_Request, tag="hello"):
    """First call: checks the protocol and opens a lease for the calling process."""

    name: ShortStr
    pid: int
    protocol: int = PROTOCOL_VERSION


class RegisterLayout(_Request, tag="register_layout"):
    """Get (or create) the G2 pool of a namespace. `cache_bytes` 0: the coordinator sizes it."""

    lease: LeaseToken
    namespace: Namespace
    cache_bytes: int = 0


class Lookup(_Request, tag="lookup"):
    """Longest cached prefix of `hashes`; with `pin`, the hits are pinned under the lease."""

    lease: LeaseToken
    pool_id: int
    hashes: list[SequenceHash]
    pin: bool = False


class Allocate(_Request, tag="allocate"):
    """Prepare a store: a Partial block owned by the caller for every hash not yet cached."""

    lease: LeaseToken
    pool_id: int
    hashes: list[SequenceHash]


class Commit(_Request, tag="commit"):
    """The caller filled these Partial blocks: register them (matchable) with their checksums."""

    lease: LeaseToken
    pool_id: int
    block_ids: list[int]
    checksums: list[Checksum]
    priority: Priority = 0


class Release(_Request, tag="release"):
    """Drop one pin per listed block."""

    lease: LeaseToken
    pool_id: int
    block_ids: list[int]


class Free(_Request, tag="free"):
    """Abort unfinished (Partial) blocks owned by the caller: back to the pool."""

    lease: LeaseToken
    pool_id: int
    block_ids: list[int]


class Touch(_Request, tag="touch"):
    """Mark cached hashes as used now (LRU), optionally setting their eviction priority. With
    `lookups` > 0 it is a client's batched report of lookups it answered from the pool's hash
    index (no round trip): `hashes` are the blocks they hit (each once, in order of first use),
    `uses` how many of those lookups hit each, `lookup_blocks` and `hit_blocks` the blocks they
    asked for and found; the coordinator counts them as its own lookups and marks the hashes used
    now (priority is not changed)."""

    lease: LeaseToken
    pool_id: int
    hashes: list[SequenceHash]
    priority: Priority | None = None
    lookups: Annotated[int, msgspec.Meta(ge=0, lt=2**32)] = 0
    lookup_blocks: Annotated[int, msgspec.Meta(ge=0, lt=2**48)] = 0
    hit_blocks: Annotated[int, msgspec.Meta(ge=0, lt=2**48)] = 0
    uses: list[Annotated[int, msgspec.Meta(ge=1, lt=2**32)]] = []

    def __post_init__(self):
        if self.lookups and len(self.uses) != len(self.hashes):
            raise ValueError(f"a usage report names {len(self.hashes)} hashes but {len(self.uses)} use counts")


class Invalidate(_Request, tag="invalidate"):
    """The caller found these blocks' bytes bad (checksum mismatch). The coordinator checksums
    each block again and drops only those whose bytes really differ from their record; the reply's
    count says how many it dropped."""

    lease: LeaseToken
    pool_id: int
    block_ids: Annotated[list[int], msgspec.Meta(max_length=MAX_INVALIDATE_BLOCKS)]
    reason: ShortStr = ""


class Cancel(_Request, tag="cancel"):
    """The caller gave up waiting for its request `target` (a timeout): undo what it left held
    under the lease, i.e. the pins of a `Lookup(pin=True)` (one still waiting for the disk tier
    pins nothing when it completes) and the unfinished blocks of an `Allocate`. Sent on the same
    socket, so it arrives after its target. The reply's count: blocks released or freed."""

    lease: LeaseToken
    target: int


class Heartbeat(_Request, tag="heartbeat"):
    lease: LeaseToken


class Goodbye(_Request, tag="goodbye"):
    """Close the lease now: pins dropped, unfinished blocks freed."""

    lease: LeaseToken


class Stats(_Request, tag="stats"):
    pass


Request = Union[Hello, RegisterLayout, Lookup, Allocate, Commit, Release, Free, Touch, Invalidate,
                Cancel, Heartbeat, Goodbye, Stats]

# ---------------------------------------------------------------- replies


class _Reply(msgspec.Struct, tag_field="kind", array_like=True):
    req: int


class ErrorReply(_Reply, tag="error"):
    code: int
    message: str
    retryable: bool = False


class OkReply(_Reply, tag="ok"):
    count: int = 0


class HelloReply(_Reply, tag="hello"):
    client_id: int  # for display (stats, block owners); restarts at 1 with the coordinator
    lease: LeaseToken  # carried by every request that acts on the lease; never shown to others
    lease_ms: int
    instance: str
    instance_id: str  # changes on every coordinator start
    coordinator_pid: int
    events_endpoint: str
    max_frame_bytes: int = 0  # the client refuses to send a larger request (FRAME_TOO_LARGE)


class PoolReply(_Reply, tag="pool"):
    pool_id: int
    segment: str  # shm name to attach
    segment_id: str  # changes whenever the segment is recreated: re-attach then
    num_blocks: int
    block_bytes: int


class LookupReply(_Reply, tag="lookup"):
    block_ids: list[int]  # the hit prefix, in order
    tiers: list[int]  # where each hit was found (the block is in G2 now)


class AllocateReply(_Reply, tag="allocate"):
    block_ids: list[int]  # one per hash: a block to fill, or a sentinel


class PoolStats(msgspec.Struct):
    pool_id: int
    model: str
    fingerprint: str
    segment: str
    num_blocks: int
    block_bytes: int
    free: int
    partial: int
    registered: int
    pinned: int
    inactive: int
    counters: dict[str, int]


class ClientInfo(msgspec.Struct):
    client_id: int  # the display id, never the lease token
    name: str
    pid: int
    pins: int
    pending: int
    expires_in_ms: int


class DiskStats(msgspec.Struct):
    """One namespace's G3 file."""

    fingerprint: str
    path: str
    num_slots: int
    block_bytes: int
    stored: int  # blocks on disk and servable
    writing: int
    reading: int
    free: int
    counters: dict[str, int]


class StatsReply(_Reply, tag="stats"):
    instance: str
    instance_id: str
    pid: int
    uptime_s: float
    cpu_cache_bytes: int
    cpu_used_bytes: int
    pools: list[PoolStats]
    clients: list[ClientInfo]
    counters: dict[str, int]
    disks: list[DiskStats] = []  # G3 files, one per namespace that has one
    tiers: dict[str, dict] = {}  # each tier's own figures, by tier name ("g4": the cluster)


Reply = Union[ErrorReply, OkReply, HelloReply, PoolReply, LookupReply, AllocateReply, StatsReply]

# ---------------------------------------------------------------- events


class BlockStored(msgspec.Struct, tag="stored"):
    pool_id: int
    fingerprint: str
    hashes: list[bytes]
    tier: int


class BlockRemoved(msgspec.Struct, tag="removed"):
    pool_id: int
    fingerprint: str
    hashes: list[bytes]
    tier: int


class PoolCleared(msgspec.Struct, tag="cleared"):
    pool_id: int
    fingerprint: str


Event = Union[BlockStored, BlockRemoved, PoolCleared]


class EventBatch(msgspec.Struct):
    seq: int
    instance_id: str
    ts_ns: int
    events: list[Event]


# ---------------------------------------------------------------- device tier (G1)
#
# An engine registers its KV tensors for worker-driven transfers with `RegisterDevice`: one
# `TensorHandle` per tensor of the pool's engine layout, each naming memory that another process
# can map (`ShmTensor`: the CPU stand-in; `CudaIpcTensor`: a legacy CUDA IPC handle of the
# allocation base plus the tensor's offset; `CudaVmmTensor`: VMM allocations whose file
# descriptors the exporter hands out over an AF_UNIX socket). `Offload` and `Onboard` answer at
# once with a transfer id; a transfer worker moves the bytes; `WaitTransfers` answers when the
# listed transfers have finished or `timeout_ms` has passed (0: poll). A finished transfer is
# reported once, then forgotten. `failed` lists positions (within the request's batch) whose
# blocks were not moved: the engine recomputes them.


class ShmTensor(msgspec.Struct, tag="shm", array_like=True):
    """A CPU stand-in tensor: `offset` bytes into the shm segment `segment`."""

    segment: ShortStr
    offset: int


class CudaIpcTensor(msgspec.Struct, tag="cuda_ipc", array_like=True):
    """cudaMalloc memory: legacy IPC handle of the allocation base, the tensor `offset` bytes in."""

    device_uuid: ShortBytes  # 16 bytes: ordinals differ between processes, UUIDs do not
    handle: ShortBytes  # the 64-byte CUipcMemHandle of the allocation base
    alloc_bytes: int
    offset: int


class VmmPiece(msgspec.Struct, array_like=True):
    """One physical allocation mapped `offset` bytes into a VMM tensor's range."""

    offset: int
    size: int


class CudaVmmTensor(msgspec.Struct, tag="cuda_vmm", array_like=True):
    """cuMemCreate memory: pieces mapped back to back, the tensor `offset` bytes into the first.

    The importer connects to the exporter's abstract AF_UNIX socket `fd_socket`, sends `token`,
    and receives one POSIX file descriptor per piece (SCM_RIGHTS)."""

    device_uuid: ShortBytes
    fd_socket: ShortStr
    token: ShortBytes
    pieces: list[VmmPiece]
    offset: int


class TensorHandle(msgspec.Struct, array_like=True):
    memory: Union[ShmTensor, CudaIpcTensor, CudaVmmTensor]
    shape: Annotated[list[int], msgspec.Meta(max_length=MAX_TENSOR_DIMS)]
    strides: Annotated[list[int], msgspec.Meta(max_length=MAX_TENSOR_DIMS)]  # in bytes
    dtype: ShortStr


class RegisterDevice(_Request, tag="register_device"):
    """Register an engine's KV tensors (in the pool's engine layout) for worker-driven transfers."""

    lease: LeaseToken
    pool_id: int
    tensors: Annotated[list[TensorHandle], msgspec.Meta(max_length=MAX_DEVICE_TENSORS)]


class UnregisterDevice(_Request, tag="unregister_device"):
    """Answered once no transfer uses the device and every worker has closed its handles."""

    lease: LeaseToken
    device_id: int


class Offload(_Request, tag="offload"):
    """G1 -> G2: copy these device blocks into new G2 blocks for the hashes not yet cached."""

    lease: LeaseToken
    device_id: int
    hashes: list[SequenceHash]
    device_block_ids: list[int]
    priority: Priority = 0


class Onboard(_Request, tag="onboard"):
    """G2 -> G1: copy the longest cached prefix of `hashes` into these device blocks."""

    lease: LeaseToken
    device_id: int
    hashes: list[SequenceHash]
    device_block_ids: list[int]


class WaitTransfers(_Request, tag="wait_transfers"):
    lease: LeaseToken
    transfer_ids: list[int]
    timeout_ms: int = 0


class DeviceReply(_Reply, tag="device"):
    device_id: int
    num_device_blocks: int


class TransferReply(_Reply, tag="transfer"):
    transfer_id: int  # 0: nothing to move, the transfer is already complete
    block_ids: list[int]  # offload: one per hash, a G2 block or a sentinel; onboard: the hit prefix


class TransferStatus(msgspec.Struct, array_like=True):
    transfer_id: int
    done: bool
    failed: list[int] = []  # positions in the request's batch whose blocks were not moved
    error: str = ""
    nbytes: int = 0


class TransfersReply(_Reply, tag="transfers"):
    transfers: list[TransferStatus]


Request = Union[Request, RegisterDevice, UnregisterDevice, Offload, Onboard, WaitTransfers]
Reply = Union[Reply, DeviceReply, TransferReply, TransfersReply]


class Clear(_Request, tag="clear"):
    """Empty a cache: drop every Registered block of pool `pool_id`, or (`pool_id` -1) of every
    pool of the instance whose model contains `model` ("" matches every pool). A pinned block is
    dropped when its last pin goes, as with `Invalidate`; every drop is a `BlockRemoved` event.
    G2 only: the disk tier keeps its copies. The reply's count: blocks dropped."""

    lease: LeaseToken
    pool_id: int = -1
    model: ShortStr = ""


Request = Union[Request, Clear]


# ---------------------------------------------------------------- cluster tier (G4)
#
# Requests a peer coordinator sends over the cluster's TCP endpoint (ZeroMQ CURVE), under a lease it
# opened there with `Hello` (its pid is taken as 0: only the lease timeout applies). Only Hello,
# Heartbeat, Goodbye, Release and the two below are answered on that endpoint. `PeerPin` pins the
# longest G2 prefix of `hashes` in the namespace `fingerprint` under the lease and says where the
# blocks are (pool, ids, checksums, the data address and stride in the serving NIXL agent, for
# a NIXL READ); the puller verifies every block's checksum after the read and releases the pins
# with `Release`. `metadata` is the serving node's NIXL agent metadata, sent when
# `metadata_version` differs from what the puller says it has. `PeerContents` pages through the
# hashes of every G2 pool (a resync of the puller's remote index).

MAX_PEER_BLOCKS = 4096  # hashes in one PeerPin
PEER_CONTENTS_PAGE = 8192  # hashes in one PeerContents reply


class PeerPin(_Request, tag="peer_pin"):
    lease: LeaseToken
    fingerprint: ShortStr
    hashes: Annotated[list[SequenceHash], msgspec.Meta(max_length=MAX_PEER_BLOCKS)]
    metadata_version: int = -1  # the serving node's metadata version the puller holds


class PeerPinReply(_Reply, tag="peer_pin"):
    pool_id: int  # -1: no pool of that namespace here
    block_ids: list[int]  # the pinned G2 prefix
    checksums: list[int]
    block_bytes: int
    data_address: int  # of block 0 where the serving node's NIXL agent maps it; block b at + b * block_stride
    block_stride: int
    metadata_version: int
    metadata: bytes = b""


class PeerContents(_Request, tag="peer_contents"):
    lease: LeaseToken
    cursor: int = 0  # 0 on the first call, then the reply's next_cursor


class PeerBlocks(msgspec.Struct, array_like=True):
    fingerprint: str
    tier: int
    hashes: list[bytes]


class PeerContentsReply(_Reply, tag="peer_contents"):
    entries: list[PeerBlocks]
    next_cursor: int  # 0: that was the last page


Request = Union[Request, PeerPin, PeerContents]
Reply = Union[Reply, PeerPinReply, PeerContentsReply]

# The reply each request gets when it succeeds (besides an ErrorReply).
REPLY_TO = {
    Hello: HelloReply, RegisterLayout: PoolReply, Lookup: LookupReply, Allocate: AllocateReply, Commit: OkReply,
    Release: OkReply, Free: OkReply, Touch: OkReply, Invalidate: OkReply, Cancel: OkReply, Heartbeat: OkReply,
    Goodbye: OkReply, Stats: StatsReply, RegisterDevice: DeviceReply, UnregisterDevice: OkReply,
    Offload: TransferReply, Onboard: TransferReply, WaitTransfers: TransfersReply, Clear: OkReply,
    PeerPin: PeerPinReply, PeerContents: PeerContentsReply,
}
assert set(REPLY_TO) == set(Request.__args__)


def check_reply_kind(request: _Request, reply: _Reply) -> None:
    """ProtocolError unless `reply` is the kind of reply `request` gets (or an error)."""
    if not isinstance(reply, (ErrorReply, REPLY_TO[type(request)])):
        raise ProtocolError(f"{type(request).__name__} got a {type(reply).__name__}")


# ---------------------------------------------------------------- encoding

_request_decoder = msgspec.msgpack.Decoder(Request)
_REQUEST_OPS = frozenset(t.__struct_config__.tag for t in Request.__args__)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_event_decoder = msgspec.msgpack.Decoder(EventBatch)
_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> list[bytes]:
    """Frames for a request, reply or event batch."""
    return [VERSION_FRAME, _encoder.encode(msg)]


def _body(frames: list) -> bytes:
    if len(frames) < 2:
        raise ProtocolError(f"expected [version][body], got {len(frames)} frame(s)")
    version = bytes(frames[0])
    if version != VERSION_FRAME:
        if version.startswith(b"kvbm/"):
            raise ProtocolError(
                f"protocol version {version[5:].decode(errors='replace')!r} is not supported; "
                f"this side speaks {PROTOCOL_VERSION}", ErrorCode.BAD_VERSION)
        raise ProtocolError("first frame is not a kvbm version frame", ErrorCode.BAD_FRAME)
    return frames[1]


def decode_request(frames: list) -> Request:
    """The request in `frames`; ProtocolError otherwise, with code BAD_VERSION or BAD_FRAME (not our
    frames, not msgpack), UNKNOWN_OP (an array whose op this side does not know: a newer peer, or
    none) or BAD_REQUEST (not an array, or a known op whose fields do not decode or break a bound)."""
    body = _body(frames)
    try:
        return _request_decoder.decode(body)
    except msgspec.ValidationError as e:
        op = _head(body)[0]
        code = ErrorCode.UNKNOWN_OP if op is not None and op not in _REQUEST_OPS else ErrorCode.BAD_REQUEST
        raise ProtocolError(f"invalid request: {e}", code) from e
    except msgspec.DecodeError as e:
        raise ProtocolError(f"request body is not msgpack: {e}") from e


def decode_reply(frames: list) -> Reply:
    try:
        return _reply_decoder.decode(_body(frames))
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ProtocolError(f"invalid reply: {e}") from e


def decode_events(frames: list) -> EventBatch:
    """Decode `[topic][version][batch]` from the PUB socket."""
    if len(frames) < 3 or frames[0] != EVENTS_TOPIC:
        raise ProtocolError("not a kv event message")
    try:
        return _event_decoder.decode(_body(frames[1:]))
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ProtocolError(f"invalid event batch: {e}") from e


def _head(body: bytes) -> tuple[object, int]:
    """(op, request id) of a body that did not decode as a Request, as far as they can be read: a
    request is an array `[op, req, fields...]`. op: None when the body is not an array, "" when the
    array has no string first; req: 0 when there is none."""
    try:
        value = msgspec.msgpack.decode(body)
    except msgspec.DecodeError:
        return None, 0
    if not isinstance(value, list):
        return None, 0
    op = value[0] if value and isinstance(value[0], str) else ""
    req = value[1] if len(value) > 1 and isinstance(value[1], int) and not isinstance(value[1], bool) else 0
    return op, req


def request_id(body: bytes) -> int:
    """Best-effort request id of an undecodable body, so that its error reply can be matched."""
    return _head(body)[1]


# ---------------------------------------------------------------- worker jobs
#
# Coordinator (ROUTER, one socket per worker kind) <-> worker processes (DEALER, identity = the
# worker's name). A worker announces itself with `WorkerReady`, then receives jobs and answers
# each with one `JobDone` naming its `job_id`. Frames are the same `[VERSION][body]` as above.


class WorkerReady(msgspec.Struct, tag="ready", array_like=True):
    name: str
    pid: int


class JobDone(msgspec.Struct, tag="done", array_like=True):
    job_id: int
    ok: bool
    error: str = ""
    failed: list[int] = []  # positions within the job's batch that did not complete
    nbytes: int = 0  # bytes moved
    checksums: list[int] = []  # in the job's order: offload, each written G2 block's checksum; DiskWrite, see there
    errnos: list[int] = []  # per entry of `failed`, when known: why (EBADMSG: the bytes failed verification)


class _Job(msgspec.Struct, tag_field="job", array_like=True):
    job_id: int


class DeviceSpec(msgspec.Struct, array_like=True):
    """A registered device as a transfer worker needs it: its tensors and their layout."""

    device_id: int
    layout: EngineLayout
    tensors: list[TensorHandle]


class TransferJob(_Job, tag="transfer"):
    """Offload (gather device blocks into G2 blocks) or onboard (scatter G2 blocks into device
    blocks). For an onboard, a block whose bytes fail their `checksums` entry is not copied and
    is reported in `JobDone.failed`."""

    offload: bool
    device: DeviceSpec
    pool_segment: str
    segment_id: str
    device_block_ids: list[int]
    g2_block_ids: list[int]
    checksums: list[int] = []  # onboard: verify before copying; empty: no verification


class CloseDevice(_Job, tag="close_device"):
    """Close this process's imported handles of a device (it was unregistered)."""

    device_id: int


TransferWorkerJob = Union[TransferJob, CloseDevice]


class _DiskJob(_Job):
    """Blocks of the G2 pool segment `segment` and slots of the G3 file `path` (`g3` format), pairwise."""

    segment: str
    segment_id: str  # the worker re-attaches when the coordinator recreated the segment
    path: str
    fingerprint: str
    block_ids: list[int]
    slots: list[int]
    hashes: list[bytes]
    generations: list[int]


class DiskWrite(_DiskJob, tag="disk_write"):
    """G2 -> G3: write each block with its slot header in one pwritev. A block whose bytes do not
    match its G2 checksum is not written (EBADMSG). `JobDone.checksums`: the xxh3-64 of each
    block's bytes, as its slot header holds it (0 for a block not written)."""

    g2_checksums: list[int]  # each block's checksum in the G2 block table
    priorities: list[int]


class DiskRead(_DiskJob, tag="disk_read"):
    """G3 -> G2: read each slot into its block, then verify the slot header (namespace, hash,
    generation, checksum) and the bytes. A block that fails (EBADMSG; ENODATA: the file is cut
    short) holds garbage and must not be registered."""

    checksums: list[int]  # the xxh3-64 each slot header must hold, and its bytes hash to


DiskJob = Union[DiskWrite, DiskRead]

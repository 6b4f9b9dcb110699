"""The wire protocol: how an undecodable request is classified (by its op, never by an error
text), and protocol structs built by keyword everywhere (with `array_like`, a positional
construction would silently shift every field after an inserted one)."""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec
import pytest

from kvbm_shm import protocol as p
from kvbm_shm.errors import ErrorCode, ProtocolError, UnknownOpError, error_from_code

ROOT = Path(__file__).resolve().parent.parent
STRUCTS = {name for name, value in vars(p).items() if isinstance(value, type) and issubclass(value, msgspec.Struct)}
# control/ is being rewritten to keywords elsewhere; it is scanned once that lands
NOT_SCANNED = ()


@pytest.mark.parametrize("body, code, req", [
    (["explode", 7], ErrorCode.UNKNOWN_OP, 7),  # an op this side does not know
    ([5, 3], ErrorCode.UNKNOWN_OP, 3),  # no op string
    ([], ErrorCode.UNKNOWN_OP, 0),
    (["lookup", 9, "not a lease"], ErrorCode.BAD_REQUEST, 9),  # a known op, bad fields
    (["hello", 4, "x" * 300, 1], ErrorCode.BAD_REQUEST, 4),  # a known op past a bound
    ({"op": "stats"}, ErrorCode.BAD_REQUEST, 0),  # not an array: no op to speak of
    ("stats", ErrorCode.BAD_REQUEST, 0),
    # a usage report of local lookups whose use counts do not match its hashes
    (["touch", 6, bytes(p.LEASE_TOKEN_BYTES), 0, [bytes(16)], None, 1, 1, 1, []], ErrorCode.BAD_REQUEST, 6),
    (["touch", 5, bytes(p.LEASE_TOKEN_BYTES), 0, [bytes(16)], None, 1, 1, 1, [0]], ErrorCode.BAD_REQUEST, 5),
])
def test_undecodable_requests_are_classified_by_their_op(body, code, req):
    frames = [p.VERSION_FRAME, msgspec.msgpack.encode(body)]
    with pytest.raises(ProtocolError) as e:
        p.decode_request(frames)
    assert (e.value.code, p.request_id(frames[1])) == (code, req)


def test_a_usage_report_decodes_with_one_use_count_per_hash():
    body = ["touch", 6, bytes(p.LEASE_TOKEN_BYTES), 0, [bytes(16), b"\1" * 16], None, 3, 12, 4, [3, 1]]
    touch = p.decode_request([p.VERSION_FRAME, msgspec.msgpack.encode(body)])
    assert (touch.hashes, touch.uses, touch.lookups, touch.hit_blocks) == ([bytes(16), b"\1" * 16], [3, 1], 3, 4)


def test_not_msgpack_and_other_versions():
    with pytest.raises(ProtocolError) as e:
        p.decode_request([p.VERSION_FRAME, b"\xc1"])
    assert e.value.code == ErrorCode.BAD_FRAME
    with pytest.raises(ProtocolError) as e:
        p.decode_request([b"kvbm/1", msgspec.msgpack.encode(["stats", 1])])
    assert e.value.code == ErrorCode.BAD_VERSION


def test_an_unknown_op_reply_is_its_own_type():
    error = error_from_code(ErrorCode.UNKNOWN_OP, "whatever the text says")
    assert type(error) is UnknownOpError and isinstance(error, ProtocolError) and error.code == ErrorCode.UNKNOWN_OP
    assert type(error_from_code(ErrorCode.BAD_FRAME, "unknown op")) is ProtocolError  # the text decides nothing


def _positional_constructions(source: str, where: str) -> list[str]:
    """`p.Struct(a, ...)` / `Struct(a, ...)` calls of protocol structs with positional arguments."""
    tree = ast.parse(source)
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").endswith("protocol") for alias in node.names} & STRUCTS
    modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in node.names if alias.name.endswith("protocol")}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr in STRUCTS and isinstance(f.value, ast.Name)
                and f.value.id in modules) or (isinstance(f, ast.Name) and f.id in imported):
            found.append(f"{where}:{node.lineno} {ast.unparse(f)}")
    return found


def test_protocol_structs_are_built_by_keyword():
    files = [f for top in ("kvbm_shm", "tests", "tools") for f in sorted((ROOT / top).rglob("*.py"))
             if not f.relative_to(ROOT).as_posix().startswith(NOT_SCANNED)]
    assert [bad for f in files for bad in _positional_constructions(f.read_text(), str(f.relative_to(ROOT)))] == []
    sample = "from kvbm_shm import protocol as p\nfrom kvbm_shm.protocol import JobDone\np.Stats(1)\nJobDone(2, ok=True)\n"
    assert _positional_constructions(sample, "x") == ["x:3 p.Stats", "x:4 JobDone"]  # the scan does find them

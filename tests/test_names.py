"""Names of segments and runtime files: built and parsed in `kvbm_shm.names` only, and a running
coordinator's files are exactly the names it gives."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

from kvbm_shm import names

from .procs import CoordinatorProcess

PACKAGE = Path(__file__).resolve().parent.parent / "kvbm_shm"
# pieces of the names only `names` may spell: segment kinds, socket, runtime and G3 file names
NAME_PIECE = re.compile(r"kvbm-$|kvbm-\{|^-pool-|^-dev-|-pool-$|-dev-$|\.sock$|runtime\.json|coordinator\.lock"
                        r"|^g3-|g3\.lock|g3-io\.lock|\.blocks$|^\.new$|^\.tmp$|^workers-")
# still spelled outside names: the coordinator's worker sockets (control/ is being rewritten elsewhere;
# it is to call names.worker_socket, and this entry then goes)
NOT_YET: set[tuple[str, str]] = set()


def _name_pieces(path: Path) -> set[tuple[str, str]]:
    """String constants (docstrings aside) in `path` that spell a piece of a name."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    rel = path.relative_to(PACKAGE).as_posix()
    return {(rel, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and NAME_PIECE.search(node.value)}


def test_no_module_but_names_spells_a_segment_or_runtime_file_name():
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "names.py":
            found |= _name_pieces(path)
    assert found - NOT_YET == set()
    assert _name_pieces(PACKAGE / "names.py")  # the scan does see names where they are spelled


def test_names_parse_back_and_instances_do_not_claim_each_other():
    assert names.parse_pool_name(names.pool_name("a-b", 7)) == ("a-b", 7)
    assert names.parse_pool_name(names.pool_name("a", 0)) == ("a", 0)
    assert names.parse_pool_name("kvbm-a-b-pool-0") == ("a-b", 0)  # instance a-b's, never a's
    assert names.parse_pool_name("kvbm-a-pool-x") is None
    assert names.parse_pool_name(names.standin_name("a", 12, 3)) is None
    assert names.parse_standin_name(names.standin_name("a.b", 12, 3)) == ("a.b", 12)
    assert names.parse_standin_name(names.pool_name("a", 1)) is None
    assert names.pool_name("x", 1).startswith(names.instance_prefix("x"))
    assert names.standin_name("x", 1, 2).startswith(names.standin_prefix("x"))
    fp = "0123456789abcdef" * 2
    assert names.parse_g3_file_name(names.g3_file_name(fp, 3)) == (3, fp)
    assert names.parse_g3_file_name(names.g3_file_name(fp, 3) + names.G3_PARTIAL_SUFFIX) is None
    assert names.parse_g3_file_name("g3-vx-" + fp + names.G3_SUFFIX) is None


def test_a_coordinator_creates_exactly_the_names_it_is_given(instance, runtime_dir):
    coordinator = CoordinatorProcess(instance, runtime_dir).start()  # one transfer worker by default
    try:
        assert sorted(os.listdir(coordinator.instance_dir)) == sorted(
            [names.CONTROL_SOCKET, names.EVENTS_SOCKET, names.worker_socket("transfer"), names.INFO_FILE,
             names.LOCK_FILE])
        assert len(names.LONGEST_SOCKET_NAME) == max(len(n) for n in os.listdir(coordinator.instance_dir)
                                                     if n.endswith(".sock"))
    finally:
        coordinator.stop()
    assert not coordinator.instance_dir.exists()

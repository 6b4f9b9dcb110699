"""The command line: every coordinator option has a `serve` flag, and `--version` answers."""

from __future__ import annotations

import dataclasses

import pytest

from kvbm_shm import __version__
from kvbm_shm.cli.main import build_parser, main
from kvbm_shm.config import ServiceConfig
from kvbm_shm.protocol import PROTOCOL_VERSION


def test_every_service_option_has_a_serve_flag():
    fields = [f.name for f in dataclasses.fields(ServiceConfig)]
    values = {"disk_write_through": True, "runtime_dir": "/tmp/x", "disk_dir": "/tmp/y", "log_level": "DEBUG",
              "instance": "flags", "metrics_host": "127.0.0.2"}
    argv = ["serve"]
    for name in fields:
        flag = "--" + name.replace("_", "-")
        argv += [flag] if name == "disk_write_through" else [flag, str(values.get(name, 3))]
    args = build_parser().parse_args(argv)
    assert {name: getattr(args, name) for name in fields} == {
        name: values.get(name, 3.0 if f.type == "float" else "3") for name, f in ServiceConfig.__dataclass_fields__.items()}


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"kvbm-shm {__version__} (protocol {PROTOCOL_VERSION})\n"

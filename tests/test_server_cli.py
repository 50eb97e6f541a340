"""The ps-server command line: every flag says what it is for, a port already in use is one
line naming it, with exit status 2, and the bulk data plane's port is the one given."""

from __future__ import annotations

import socket
import subprocess

import pytest

from protos.listen import address_in_use
from ps_server.main import build_parser, parse_args
from ps_worker import Client
from scheduler.launch import BIN, servers


def test_every_flag_has_a_help_text_without_backticks():
    for action in build_parser()._actions:
        assert action.help and "`" not in action.help, action.option_strings


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_port_in_use_is_one_line_that_says_so_and_exit_status_2():
    with socket.socket() as held:  # another process's listener, as far as ps-server knows
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert address_in_use("127.0.0.1", port) and address_in_use("localhost", port)
        refused_in_one_line(port, "--port", str(port))
    assert not address_in_use("127.0.0.1", 0)


def refused_in_one_line(port: int, *flags: str) -> None:
    """ps-server with these flags exits 2 saying that 127.0.0.1:port is in use."""
    result = subprocess.run(
        [str(BIN / "ps-server"), "--host", "127.0.0.1", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"ps-server: cannot listen on 127.0.0.1:{port}: address in use"
    ]


@pytest.mark.parametrize(("given", "port"), [("auto", 0), ("0", 0), ("none", None), ("7009", 7009)])
def test_bulk_port_choices(given, port):
    assert parse_args(["--bulk-port", given]).bulk_port == port


@pytest.mark.parametrize("given", ["65536", "-1", "seven", ""])
def test_a_bad_bulk_port_is_refused(given, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--bulk-port", given])
    assert info.value.code == 2
    assert "--bulk-port must be 'auto', 'none' or a port (0: a free one)" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_bulk_port_from_the_environment_is_the_one_status_advertises(tmp_path, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PS_BULK_PORT", str(port))
    with servers(1, tmp_path) as (daemon,), Client([daemon.address]) as c:
        assert c.status()[0].bulk_port == port
    with socket.socket() as held:  # taken: one line, exit status 2
        held.bind(("127.0.0.1", port))
        held.listen()
        refused_in_one_line(port, "--port", "0")

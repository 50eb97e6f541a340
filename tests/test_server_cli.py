"""The ps-server command line: every flag says what it is for, and a port already in use is one
line naming it, with exit status 2."""

from __future__ import annotations

import socket
import subprocess

import pytest

from protos.listen import address_in_use
from ps_server.main import build_parser
from scheduler.launch import BIN


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
        result = subprocess.run(
            [str(BIN / "ps-server"), "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"ps-server: cannot listen on 127.0.0.1:{port}: address in use"
    ]
    assert not address_in_use("127.0.0.1", 0)

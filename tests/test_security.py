"""Tokens and TLS: refused without them (and nothing changes), trains with them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import ps_pb2, rpc
from protos.security import ClientSecurity, SecurityError, ServerSecurity, read_token
from ps_worker import Client, ClientConfig, PSError
from scheduler.launch import BIN, servers

TOKEN = "s3cret-token"


def test_token_comes_from_the_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("PS_TOKEN", raising=False)
    assert read_token(None) is None
    monkeypatch.setenv("PS_TOKEN", "from-env")
    assert read_token(None) == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    assert read_token(tmp_path / "t") == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecurityError, match="empty"):
        read_token(tmp_path / "empty")
    with pytest.raises(SecurityError, match="cannot read"):
        read_token(tmp_path / "missing")


@pytest.mark.timeout(10)
def test_a_token_is_stripped_and_one_with_inner_space_or_control_characters_refused(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("PS_TOKEN", "from-env\n")  # a Kubernetes secret from a file
    assert read_token(None) == "from-env"
    monkeypatch.setenv("PS_TOKEN", " \n")
    assert read_token(None) is None  # blank: as unset
    for bad, shown in (("two words", "' '"), ("tab\there", "'\\t'"), ("caf\u00e9", "'\u00e9'")):
        monkeypatch.setenv("PS_TOKEN", bad)
        with pytest.raises(SecurityError, match="printable ASCII") as info:
            read_token(None)
        assert str(info.value).startswith(f"$PS_TOKEN holds {shown} at character")
        assert "\n" not in str(info.value)
        (tmp_path / "t").write_text(f"{bad}\n")
        with pytest.raises(SecurityError, match=f"the token file {tmp_path / 't'} holds"):
            read_token(tmp_path / "t")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_client_with_a_token_ending_in_a_newline_is_let_in(tmp_path, monkeypatch):
    (tmp_path / "token").write_text(TOKEN)
    with servers(1, tmp_path, "--token-file", str(tmp_path / "token")) as (server,):
        monkeypatch.setenv("PS_TOKEN", f"{TOKEN}\n")
        with Client([server.address], "t", "w0") as client:
            assert [s.initialised for s in client.status()] == [False]


def test_half_configured_tls_is_refused(tmp_path):
    with pytest.raises(SecurityError, match="both"):
        ServerSecurity(tls_cert=tmp_path / "c")
    with pytest.raises(SecurityError, match="server's own"):
        ServerSecurity(tls_client_ca=tmp_path / "ca")
    with pytest.raises(SecurityError, match="--tls-ca"):
        ClientSecurity(tls_cert=tmp_path / "c", tls_key=tmp_path / "k")


def model() -> dict[str, torch.Tensor]:
    return {"w": torch.ones(10), "b": torch.zeros(3)}


def config(**kw) -> ClientConfig:
    return ClientConfig(retries=1, timeout_s=10, **kw)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_calls_without_the_token_are_refused_and_change_nothing(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with servers(1, tmp_path, "--token-file", str(token_file)) as (daemon,):
        good = config(security=ClientSecurity(token=TOKEN))
        with Client([daemon.address], job_id="j", worker_id="w", config=good) as c:
            c.init(model(), optimizer="sgd", lr=1.0)
            c.push({k: torch.ones_like(v) for k, v in model().items()})
            before = c.pull(observe=True)
        for name, security in [("no token", None), ("a wrong token", ClientSecurity("nope"))]:
            bad = config(security=security) if security else config()
            with Client([daemon.address], job_id="j", worker_id="x", config=bad) as c:
                for call in (
                    lambda: c.status(),
                    lambda: c.push({k: torch.ones_like(v) for k, v in model().items()}),
                    lambda: c.pull(),
                    lambda: c.init(model(), optimizer="sgd", lr=5.0),
                ):
                    with pytest.raises(PSError) as info:
                        call()
                    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
                    assert name in str(info.value)
        # raw calls of every shape are refused too, and the health service stays open
        with grpc.insecure_channel(daemon.address) as channel:
            calls = rpc.calls(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(calls.pull(ps_pb2.PullRequest(job_id="j", worker_id="x"), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                calls.step(b"garbage", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with Client([daemon.address], job_id="j", worker_id="r", config=good) as c:
            after = c.pull(observe=True)
            assert c.status()[0].pushes_received == 1
    for k in before:
        assert torch.equal(before[k], after[k])


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    """A CA and a certificate it signs for 127.0.0.1 and localhost (server and client use)."""
    directory.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={name} CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "node.key", "-out", "node.csr", cwd=directory)  # fmt: skip
    (directory / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "node.pem",
            cwd=directory)  # fmt: skip


@pytest.fixture
def pki(tmp_path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    good, other = tmp_path / "pki", tmp_path / "other-pki"
    make_ca(good, "good")
    make_ca(other, "other")
    return good, other


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_tls_and_mutual_tls_refuse_the_wrong_ca_and_train_with_the_right_one(tmp_path, pki):
    good, other = pki
    tls = ["--tls-cert", str(good / "node.pem"), "--tls-key", str(good / "node.key")]
    plain = config(same_host_unix_socket=False, same_host_shared_memory=False)
    with servers(1, tmp_path, *tls, "--unix-socket", "none", "--shm-dir", "none") as (daemon,):
        health = [str(BIN / "ps-health"), daemon.address, "--tls-ca", str(good / "ca.pem")]
        assert subprocess.run(health, capture_output=True, timeout=60).returncode == 0
        trusted = config(security=ClientSecurity(tls_ca=good / "ca.pem"))
        with Client([daemon.address], job_id="t", worker_id="w", config=trusted) as c:
            c.init(model(), optimizer="sgd", lr=1.0)
            c.push({k: torch.ones_like(v) for k, v in model().items()})
            assert torch.equal(c.pull()["w"], torch.zeros(10))
            assert c.transports == ["bulk"]  # the bulk data plane, under the same TLS
        for security in (ClientSecurity(tls_ca=other / "ca.pem"), None):  # wrong CA; no TLS
            bad = config(security=security) if security else plain
            with Client([daemon.address], job_id="t", worker_id="x", config=bad) as c:
                with pytest.raises(PSError) as info:
                    c.status()
                assert info.value.code == grpc.StatusCode.UNAVAILABLE
    mutual = [*tls, "--tls-client-ca", str(good / "ca.pem")]
    with servers(1, tmp_path, *mutual, "--unix-socket", "none", "--shm-dir", "none") as (daemon,):
        no_cert = config(security=ClientSecurity(tls_ca=good / "ca.pem"))
        with Client([daemon.address], job_id="m", worker_id="x", config=no_cert) as c:
            with pytest.raises(PSError) as info:
                c.status()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        foreign = ClientSecurity(
            tls_ca=other / "ca.pem", tls_cert=other / "node.pem", tls_key=other / "node.key"
        )
        with (
            Client(
                [daemon.address], job_id="m", worker_id="x", config=config(security=foreign)
            ) as c,
            pytest.raises(PSError),
        ):
            c.status()  # a certificate the server's CA did not sign
        cert = ClientSecurity(
            tls_ca=good / "ca.pem", tls_cert=good / "node.pem", tls_key=good / "node.key"
        )
        with Client([daemon.address], job_id="m", worker_id="w", config=config(security=cert)) as c:
            c.init(model(), optimizer="sgd", lr=1.0)
            c.push({k: torch.ones_like(v) for k, v in model().items()})
            assert torch.equal(c.pull()["w"], torch.zeros(10))
            assert c.transports == ["bulk"]  # mutual TLS on the bulk data plane too


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_secured_cluster_of_daemons_trains_with_token_and_tls(tmp_path, pki):
    """ps-server, ps-scheduler and ps-worker with the flags the README gives, end to end."""
    from ps_worker.data import prepare
    from scheduler.launch import Daemon

    good, _ = pki
    token = tmp_path / "token"
    token.write_text(TOKEN)
    data = tmp_path / "data"
    prepare("digits", data, shards=4, samples=400)
    secret = ["--token-file", str(token)]
    serve = ["--tls-cert", str(good / "node.pem"), "--tls-key", str(good / "node.key")]
    ca = ["--tls-ca", str(good / "ca.pem")]
    daemons = []
    try:
        with servers(1, tmp_path, *secret, *serve) as (server,):
            scheduler = Daemon(
                [str(BIN / "ps-scheduler"), "--port", "0", "--state", str(tmp_path / "s.db"),
                 "--data-dir", str(data), "--servers", server.address, "--model", "digits-mlp",
                 "--epochs", "1", *secret, *serve, *ca],
                tmp_path / "scheduler.log",
            )  # fmt: skip
            daemons.append(scheduler)
            worker = Daemon(
                [str(BIN / "ps-worker"), "--scheduler", scheduler.address, "--no-progress",
                 *secret, *ca],
                tmp_path / "worker.log",
            )  # fmt: skip
            daemons.append(worker)
            assert worker.proc.wait(180) == 0, (tmp_path / "worker.log").read_text()[-2000:]
            status = [str(BIN / "ps-scheduler"), "status", "--scheduler", scheduler.address]
            secured = subprocess.run(
                [*status, *secret, *ca], capture_output=True, text=True, timeout=60
            )
            assert secured.returncode == 0 and "finished" in secured.stdout, secured.stderr
            plain = subprocess.run(status, capture_output=True, text=True, timeout=60)
            assert plain.returncode != 0  # no TLS, no token: refused
    finally:
        for d in daemons:
            d.stop()

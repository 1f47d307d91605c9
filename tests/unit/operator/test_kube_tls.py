"""kube.share_tls_context against a real TLS server that requires a client certificate: every new
connection reuses one context (the CA and the client key loaded once) and resumes the TLS session
of an earlier one, the client still authenticated; verification is kept."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3.connection
from kubernetes import client
from tpi_operator.kube import Kube, load_configuration


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make this test's certificates (apt install openssl)"
    subprocess.run([openssl, *args], check=True, capture_output=True)


def _key_and_csr(d: Path, name: str, cn: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={cn}",
             "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
             "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.crt"))  # fmt: skip


def _signed(d: Path, name: str, cn: str, ca: str, ext: str) -> None:
    _key_and_csr(d, name, cn)
    (d / f"{name}.ext").write_text(ext + "\n")
    _openssl("x509", "-req", "-days", "1", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.crt"),
             "-CAkey", str(d / f"{ca}.key"), "-CAcreateserial", "-extfile", str(d / f"{name}.ext"),
             "-out", str(d / f"{name}.crt"))  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _signed(d, "server", "server", "ca", "subjectAltName=IP:127.0.0.1")
    _signed(d, "client", "tpi-operator", "ca", "extendedKeyUsage=clientAuth")
    return d


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    client_names: list[str]
    resumed: list[bool]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        cert = self.connection.getpeercert()  # type: ignore[attr-defined]
        subject = dict(x[0] for x in cert["subject"])
        self.server.client_names.append(subject["commonName"])  # type: ignore[attr-defined]
        self.server.resumed.append(self.connection.session_reused)  # type: ignore[attr-defined]
        body = json.dumps({"items": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")  # every request needs a new connection
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(certs: Path, port: int = 0) -> _Server:
    """An HTTPS server on 127.0.0.1 that requires a client certificate signed by `ca` (its own
    session ticket keys: a new one refuses the tickets of an earlier one, as a restarted API server)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.crt", certs / "server.key")
    ctx.load_verify_locations(certs / "ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED
    srv = _Server(("127.0.0.1", port), _Handler)
    srv.client_names, srv.resumed = [], []
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _stop(srv: _Server) -> None:
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def server(certs: Path) -> Iterator[_Server]:
    srv = _serve(certs)
    yield srv
    _stop(srv)


def _kubeconfig(certs: Path, port: int, ca: str = "ca") -> str:
    path = certs / f"kubeconfig-{ca}-{port}"
    path.write_text(json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {
            "server": f"https://127.0.0.1:{port}", "certificate-authority": str(certs / f"{ca}.crt")}}],
        "users": [{"name": "u", "user": {
            "client-certificate": str(certs / "client.crt"), "client-key": str(certs / "client.key")}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }))  # fmt: skip
    return str(path)


@pytest.fixture()
def per_connection_contexts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the contexts urllib3 builds for a new connection when it was given none."""
    built: list[int] = []
    original = urllib3.connection.create_urllib3_context

    def counting(*args: object, **kwargs: object) -> ssl.SSLContext:
        built.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(urllib3.connection, "create_urllib3_context", counting)
    return built


def _list_concurrently(kube: Kube, n: int) -> None:
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: kube.list("Pod", "ns"), range(n))) == [[]] * n


def test_new_connections_share_one_tls_context_resume_the_session_and_keep_the_client_identity(
    certs: Path, server: _Server, per_connection_contexts: list[int]
) -> None:
    kube = Kube.connect(pool_size=4, kubeconfig=_kubeconfig(certs, server.server_address[1]))
    kube.list("Pod", "ns")  # the first connection: a full handshake, and a session ticket
    _list_concurrently(kube, 12)
    assert server.client_names == ["tpi-operator"] * 13  # 13 connections, each the client's identity
    assert server.resumed == [False] + [True] * 12
    assert per_connection_contexts == []


def test_the_kubernetes_clients_own_pool_builds_a_context_per_connection(
    certs: Path, server: _Server, per_connection_contexts: list[int]
) -> None:
    """The cost share_tls_context removes (and proof that the counter above counts)."""
    cfg = load_configuration(_kubeconfig(certs, server.server_address[1]))
    _list_concurrently(Kube(client.ApiClient(configuration=cfg)), 12)
    assert len(per_connection_contexts) == 12
    assert server.resumed == [False] * 12


def test_the_shared_context_still_verifies_the_server(certs: Path, server: _Server) -> None:
    kube = Kube.connect(pool_size=4, kubeconfig=_kubeconfig(certs, server.server_address[1], ca="other-ca"))
    with pytest.raises(urllib3.exceptions.MaxRetryError, match="CERTIFICATE_VERIFY_FAILED"):
        kube.list("Pod", "ns")
    assert server.client_names == []


def test_a_refused_ticket_falls_back_to_a_full_handshake(certs: Path, server: _Server) -> None:
    port = server.server_address[1]
    kube = Kube.connect(pool_size=4, kubeconfig=_kubeconfig(certs, port))
    kube.list("Pod", "ns")
    kube.list("Pod", "ns")
    assert server.resumed == [False, True]
    _stop(server)
    restarted = _serve(certs, port)  # new ticket keys: the kept ticket is refused
    try:
        kube.list("Pod", "ns")
        kube.list("Pod", "ns")
        assert restarted.client_names == ["tpi-operator"] * 2
        assert restarted.resumed == [False, True]  # a full handshake, then its own new ticket
    finally:
        _stop(restarted)

"""How the operator authenticates to Kubernetes, against a recording HTTPS server (a CA made
here): in a pod (service-account token file, CA file, KUBERNETES_SERVICE_HOST/PORT; the token
rotates), and from kubeconfigs with a token, a client certificate and an exec plugin."""

from __future__ import annotations

import datetime
import json
import ssl
import sys
from pathlib import Path

import pytest
import trustme
import yaml
from aiohttp import web
from kubernetes_asyncio.config import incluster_config

from handler_operator.clients import KubeApi
from tests.processes import free_port

SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "ns"}}


class Recorder:
    """An HTTPS server that answers every GET with a Secret and records who asked."""

    def __init__(self, ca: trustme.CA, require_client_cert: bool = False):
        self.ca = ca
        self.port = free_port()
        self.seen: list[dict[str, str | None]] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(self.context)
        if require_client_cert:
            ca.configure_trust(self.context)
            self.context.verify_mode = ssl.CERT_REQUIRED
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(item[0] for item in peer["subject"]) if peer else {}
        self.seen.append(
            {
                "path": request.path,
                "authorization": request.headers.get("Authorization"),
                "client": subject.get("commonName"),
            }
        )
        return web.json_response(SECRET)

    async def __aenter__(self) -> Recorder:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.context).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def kubeconfig(path: Path, server: str, ca: trustme.CA, user: dict) -> str:
    ca_file = path.parent / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {"server": server, "certificate-authority": str(ca_file)},
                    }
                ],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return str(path)


async def read_secret(kube: KubeApi) -> dict | None:
    return await kube.get("v1", "Secret", "ns", "s")


async def read_once(config_file: str) -> dict | None:
    """Connect with `config_file`, make one request, close."""
    kube = await KubeApi.connect(config_file)
    try:
        return await read_secret(kube)
    finally:
        await kube.close()


async def test_in_cluster_the_token_is_sent_as_is_and_a_rotated_token_is_picked_up(
    ca, tmp_path, monkeypatch
):
    token_file, ca_file = tmp_path / "token", tmp_path / "ca.crt"
    token_file.write_text("first.jwt.token")
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token_file))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca_file))
    # The client re-reads the token file at most once a period (a minute, as client-go does);
    # zero here, so the very next request must carry a rotated token.
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", datetime.timedelta(0))
    async with Recorder(ca) as server:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
        kube = await KubeApi.connect()
        try:
            assert (await read_secret(kube))["kind"] == "Secret"
            token_file.write_text("second.jwt.token")  # the kubelet rotated the projected token
            await read_secret(kube)
        finally:
            await kube.close()
    assert [s["authorization"] for s in server.seen] == [
        "Bearer first.jwt.token",
        "Bearer second.jwt.token",
    ]
    assert server.seen[0]["path"] == "/api/v1/namespaces/ns/secrets/s"


async def test_kubeconfig_with_a_token(ca, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    async with Recorder(ca) as server:
        path = kubeconfig(tmp_path / "config", server.server, ca, {"token": "kubeconfig-token"})
        await read_once(path)
    assert [s["authorization"] for s in server.seen] == ["Bearer kubeconfig-token"]


async def test_kubeconfig_with_a_client_certificate(ca, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client = ca.issue_cert("operator@example.com", common_name="system:serviceaccount:x:op")
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    async with Recorder(ca, require_client_cert=True) as server:
        path = kubeconfig(
            tmp_path / "config",
            server.server,
            ca,
            {"client-certificate": str(cert), "client-key": str(key)},
        )
        await read_once(path)
    assert server.seen == [
        {
            "path": "/api/v1/namespaces/ns/secrets/s",
            "authorization": None,
            "client": "system:serviceaccount:x:op",
        }
    ]


async def test_kubeconfig_with_an_exec_plugin(ca, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "exec-plugin-token"},
    }
    plugin = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "command": sys.executable,
        "args": ["-c", f"print({json.dumps(json.dumps(credential))})"],
        "interactiveMode": "Never",
    }
    async with Recorder(ca) as server:
        path = kubeconfig(tmp_path / "config", server.server, ca, {"exec": plugin})
        await read_once(path)
    assert [s["authorization"] for s in server.seen] == ["Bearer exec-plugin-token"]

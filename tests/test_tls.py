"""TLS and mutual TLS on every port a service opens, with real certificates on loopback servers.

The runtime's gRPC server and /metrics endpoint, the policy's HTTP API, the outgoing channel
(the reward service's remote scorer path) and the container health check all read the same
`tls_*` settings (flywheel/runtime/tls.py).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from tls_certs import make_pki

from flywheel.runtime import ServiceRuntime, ServiceSettings
from flywheel.runtime.client import blocking_channel
from flywheel.runtime.tls import TlsFiles

REPO = Path(__file__).resolve().parents[1]
HEALTH_CHECK = REPO / "docker" / "grpc_health_check.py"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"), dns_names=("reward.flywheel.svc",))


async def check(channel: grpc.Channel) -> int:
    """A blocking client, off the event loop that runs the server."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await asyncio.to_thread(stub.Check, health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status


async def start(settings_factory, serve, **tls) -> tuple[ServiceRuntime, str]:
    runtime = ServiceRuntime(settings_factory(**tls))
    target = await serve(runtime)
    return runtime, target


def credentials(pki: Path, ca: str = "ca.crt", client: str | None = None) -> grpc.ChannelCredentials:
    files = TlsFiles(cert_file=pki / f"{client}.crt" if client else None,
                     key_file=pki / f"{client}.key" if client else None, ca_file=pki / ca)
    creds = files.grpc_channel_credentials()
    assert creds is not None
    return creds


async def test_grpc_serves_tls_and_refuses_plaintext_and_unknown_cas(pki, settings_factory, serve) -> None:
    _, target = await start(settings_factory, serve, tls_cert_file=pki / "server.crt", tls_key_file=pki / "server.key")
    with blocking_channel(target, credentials(pki), retries=False) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
    # The certificate names reward.flywheel.svc too: a client dialling the address can check that name.
    with blocking_channel(target, credentials(pki), retries=False, server_name="reward.flywheel.svc") as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
    with blocking_channel(target, None, retries=False) as channel, pytest.raises(grpc.RpcError) as err:
        await check(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with blocking_channel(target, credentials(pki, ca="other-ca.crt"), retries=False) as channel, \
            pytest.raises(grpc.RpcError) as err:
        await check(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with blocking_channel(target, credentials(pki), retries=False, server_name="policy.elsewhere") as channel, \
            pytest.raises(grpc.RpcError):
        await check(channel)


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki, settings_factory, serve) -> None:
    _, target = await start(settings_factory, serve, tls_cert_file=pki / "server.crt",
                            tls_key_file=pki / "server.key", tls_client_ca_file=pki / "ca.crt")
    with blocking_channel(target, credentials(pki, client="client"), retries=False) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
    with blocking_channel(target, credentials(pki), retries=False) as channel, pytest.raises(grpc.RpcError) as err:
        await check(channel)  # no client certificate
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_metrics_endpoint_serves_https_and_mtls(pki, settings_factory, serve) -> None:
    runtime, _ = await start(settings_factory, serve, tls_cert_file=pki / "server.crt",
                             tls_key_file=pki / "server.key", tls_client_ca_file=pki / "ca.crt")
    url = f"https://127.0.0.1:{runtime.metrics_port}/metrics"
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))

    def get(url: str, context: ssl.SSLContext | None = None) -> str:
        return urllib.request.urlopen(url, context=context, timeout=5).read().decode()

    assert "flywheel_service_serving" in await asyncio.to_thread(get, url, context)
    anonymous = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        await asyncio.to_thread(get, url, anonymous)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        await asyncio.to_thread(get, f"http://127.0.0.1:{runtime.metrics_port}/metrics")


async def test_policy_http_api_serves_https(pki) -> None:
    from flywheel.policy.http_api import TGIHttpApi
    from flywheel.policy.sampling import SamplingDefaults

    files = TlsFiles(cert_file=pki / "server.crt", key_file=pki / "server.key")
    # /metrics never touches the backend: the HTTPS listener, not generation, is under test.
    api = TGIHttpApi(None, SamplingDefaults(), host="127.0.0.1", port=0,  # type: ignore[arg-type]
                     ssl_context=files.http_server_context())
    await api.start()
    try:
        import aiohttp

        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://localhost:{api.port}/metrics", ssl=context) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://localhost:{api.port}/metrics") as resp:
                    await resp.read()
    finally:
        await api.stop()


async def test_health_check_script_probes_over_mtls_from_the_service_environment(pki, settings_factory,
                                                                                 serve) -> None:
    runtime, target = await start(settings_factory, serve, tls_cert_file=pki / "server.crt",
                                  tls_key_file=pki / "server.key", tls_client_ca_file=pki / "ca.crt")
    # What a probe inside the pod sees: the service's own FLYWHEEL_TLS_* variables, no flags.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_GRPC_PORT=str(runtime.grpc_port), FLYWHEEL_TLS_CA_FILE=str(pki / "ca.crt"),
               FLYWHEEL_TLS_CERT_FILE=str(pki / "server.crt"), FLYWHEEL_TLS_KEY_FILE=str(pki / "server.key"),
               FLYWHEEL_TLS_SERVER_NAME="reward.flywheel.svc")

    async def probe(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(subprocess.run, [sys.executable, str(HEALTH_CHECK), *args],
                                       env={**env, **extra}, capture_output=True, text=True, timeout=60)

    ok = await probe()
    assert ok.returncode == 0, ok.stderr
    assert (await probe("--address", target)).returncode == 0
    no_client_cert = await probe(FLYWHEEL_TLS_CERT_FILE="", FLYWHEEL_TLS_KEY_FILE="")
    assert no_client_cert.returncode == 1 and "UNAVAILABLE" in no_client_cert.stderr
    assert (await probe(FLYWHEEL_TLS_CA_FILE="")).returncode == 1  # plaintext against a TLS port


def test_tls_settings_must_be_complete(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set together"):
        TlsFiles(cert_file=tmp_path / "a.crt")
    with pytest.raises(ValueError, match="mutual TLS"):
        TlsFiles(client_ca_file=tmp_path / "ca.crt")
    assert TlsFiles().grpc_server_credentials() is None and TlsFiles().grpc_channel_credentials() is None


def test_kafka_client_config_carries_sasl_and_ssl_to_every_client(tmp_path: Path) -> None:
    settings = ServiceSettings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN",
                               kafka_sasl_username="svc", kafka_sasl_password="s3cret",
                               kafka_ssl_cafile=tmp_path / "ca.crt")
    assert settings.kafka_client_config() == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_plain_username": "svc",
        "sasl_plain_password": "s3cret", "ssl_check_hostname": True, "ssl_cafile": str(tmp_path / "ca.crt")}
    assert "s3cret" not in repr(settings)
    assert ServiceSettings().kafka_client_config() == {"security_protocol": "PLAINTEXT"}
    with pytest.raises(ValidationError, match="kafka_sasl_username"):
        ServiceSettings(kafka_security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ValidationError, match="kafka_security_protocol"):
        ServiceSettings(kafka_security_protocol="SASL")


async def test_cli_channel_dials_with_the_pods_own_tls_settings(pki, settings_factory, serve, monkeypatch) -> None:
    """`kubectl exec ... flywheel trainer status` inside a TLS pod: the CLI presents the pod's certificate."""
    from flywheel.runtime.client import cli_channel

    _, target = await start(settings_factory, serve, tls_cert_file=pki / "server.crt",
                            tls_key_file=pki / "server.key", tls_client_ca_file=pki / "ca.crt")
    monkeypatch.setenv("FLYWHEEL_TLS_CA_FILE", str(pki / "ca.crt"))
    monkeypatch.setenv("FLYWHEEL_TLS_CERT_FILE", str(pki / "client.crt"))
    monkeypatch.setenv("FLYWHEEL_TLS_KEY_FILE", str(pki / "client.key"))
    with cli_channel(target) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
    monkeypatch.delenv("FLYWHEEL_TLS_CA_FILE")
    with cli_channel(target) as channel, pytest.raises(grpc.RpcError):
        await check(channel)  # plaintext against a TLS port

"""Client-side helpers: channels with the same options as servers, and a retry policy."""

from __future__ import annotations

import json

import grpc
from grpc import aio

_RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
                },
            }
        ]
    }
)


def channel_options(max_message_bytes: int = 64 * 1024 * 1024, retries: bool = True) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.enable_retries", 1 if retries else 0),
    ]
    if retries:
        options.append(("grpc.service_config", _RETRY_SERVICE_CONFIG))
    return options


def insecure_channel(target: str, *, retries: bool = True) -> grpc.Channel:
    """A blocking channel (CLI, tests, scripts)."""
    return grpc.insecure_channel(target, options=channel_options(retries=retries))


def cli_channel(target: str) -> grpc.Channel:
    """A CLI's channel: TLS (mutual, with a certificate) when the FLYWHEEL_TLS_* environment says so,
    sending $FLYWHEEL_API_KEY when set.

    Inside a pod (`kubectl exec ... flywheel trainer status`) that is the pod's own TLS settings;
    the chart's certificate names localhost and 127.0.0.1 for exactly this.
    """
    from flywheel.runtime.config import ServiceSettings
    from flywheel.runtime.tls import TlsFiles

    return with_api_key(blocking_channel(target, TlsFiles.from_settings(ServiceSettings()).grpc_channel_credentials()))


def blocking_channel(target: str, credentials: grpc.ChannelCredentials | None, *, retries: bool = True,
                     server_name: str | None = None) -> grpc.Channel:
    """A blocking channel: TLS with `credentials` (TlsFiles.grpc_channel_credentials()), else plaintext.

    `server_name` checks the server certificate against that name instead of the target's host
    (dialling an address that is not in the certificate, e.g. a probe on 127.0.0.1).
    """
    if credentials is None:
        return insecure_channel(target, retries=retries)
    options = channel_options(retries=retries)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, credentials, options=options)


def aio_channel(target: str, *, retries: bool = True, root_certificates: bytes | None = None) -> aio.Channel:
    """An asyncio channel; TLS when root_certificates is given."""
    if root_certificates is not None:
        return aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates),
                                  options=channel_options(retries=retries))
    return aio.insecure_channel(target, options=channel_options(retries=retries))


API_KEY_ENV = "FLYWHEEL_API_KEY"


class _BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                         grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call of a blocking channel."""

    def __init__(self, key: str) -> None:
        self._metadata = ("authorization", f"Bearer {key}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        class Details(grpc.ClientCallDetails):
            pass

        new = Details()
        new.method, new.timeout, new.credentials = details.method, details.timeout, details.credentials
        new.wait_for_ready, new.compression = details.wait_for_ready, details.compression
        new.metadata = [*(details.metadata or ()), self._metadata]
        return new

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


def with_api_key(channel: grpc.Channel, key: str | None = None) -> grpc.Channel:
    """`channel` sending an API key (`key`, else $FLYWHEEL_API_KEY; none: unchanged) on every call."""
    import os

    key = key if key is not None else os.environ.get(API_KEY_ENV, "")
    return grpc.intercept_channel(channel, _BearerInterceptor(key)) if key else channel

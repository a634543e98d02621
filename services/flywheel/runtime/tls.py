"""TLS for every port a service opens or dials: gRPC server and client, and the HTTP endpoints.

One certificate per service (the chart mounts a Kubernetes TLS Secret: tls.crt, tls.key,
ca.crt) serves three purposes: the server certificate of the gRPC, /metrics and HTTP ports;
the client certificate when the service dials another one; and, with `tls_client_ca_file`
set, the trust anchor the server checks client certificates against (mutual TLS).

    FLYWHEEL_TLS_CERT_FILE + FLYWHEEL_TLS_KEY_FILE   serve TLS
    FLYWHEEL_TLS_CLIENT_CA_FILE                      ...and require client certificates it signed (mTLS)
    FLYWHEEL_TLS_CA_FILE                             trust this CA when dialling (outgoing TLS)
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one service's TLS identity and trust."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")

    @classmethod
    def from_settings(cls, settings: object) -> "TlsFiles":
        return cls(getattr(settings, "tls_cert_file", None), getattr(settings, "tls_key_file", None),
                   getattr(settings, "tls_client_ca_file", None), getattr(settings, "tls_ca_file", None))

    @property
    def serving(self) -> bool:
        return self.cert_file is not None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    @property
    def dialling(self) -> bool:
        return self.ca_file is not None

    # -- servers -------------------------------------------------------------------------------
    def grpc_server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.serving:
            return None
        assert self.cert_file and self.key_file
        pair = [(self.key_file.read_bytes(), self.cert_file.read_bytes())]
        if self.mutual:
            assert self.client_ca_file
            return grpc.ssl_server_credentials(pair, root_certificates=self.client_ca_file.read_bytes(),
                                               require_client_auth=True)
        return grpc.ssl_server_credentials(pair)

    def http_server_context(self) -> ssl.SSLContext | None:
        """For aiohttp (the policy's HTTP API); TLS 1.2+, client certificates required under mTLS."""
        if not self.serving:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        if self.mutual:
            context.load_verify_locations(cafile=str(self.client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def metrics_server_kwargs(self) -> dict[str, object]:
        """Keyword arguments of prometheus_client.start_http_server for an HTTPS /metrics."""
        if not self.serving:
            return {}
        kwargs: dict[str, object] = {"certfile": str(self.cert_file), "keyfile": str(self.key_file),
                                     "tls_min_version": ssl.TLSVersion.TLSv1_2}
        if self.mutual:
            kwargs.update(client_cafile=str(self.client_ca_file), client_auth_required=True)
        return kwargs

    # -- clients -------------------------------------------------------------------------------
    def grpc_channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials for dialling another service: its CA, and our certificate for mTLS."""
        if not self.dialling:
            return None
        assert self.ca_file
        if self.serving:
            assert self.cert_file and self.key_file
            return grpc.ssl_channel_credentials(self.ca_file.read_bytes(), self.key_file.read_bytes(),
                                                self.cert_file.read_bytes())
        return grpc.ssl_channel_credentials(self.ca_file.read_bytes())

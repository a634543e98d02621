#!/usr/bin/env python3
"""Container health check: ask the service's gRPC health endpoint whether it is SERVING.

Used by the image's HEALTHCHECK, by docker compose and by the Helm chart's `helm test` pod;
Kubernetes probes use the kubelet's native gRPC probe, or this script when the service serves
TLS (the kubelet's gRPC probe speaks plaintext only). Exit 0 when every named service reports
SERVING, 1 otherwise (including connection errors, TLS failures and timeouts).

    grpc_health_check.py                                 # 127.0.0.1:$FLYWHEEL_GRPC_PORT, overall health
    grpc_health_check.py --address reward:50052 --service flywheel.v1.RewardService

TLS is on when --tls-ca is given or FLYWHEEL_TLS_CA_FILE is set (the service's own settings, so a
probe inside the pod needs no flags); the certificate FLYWHEEL_TLS_CERT_FILE/_KEY_FILE is
presented for mutual TLS, and FLYWHEEL_TLS_SERVER_NAME (--server-name) is the name checked in the
server's certificate when dialling an address it does not name (127.0.0.1).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(address: str, ca: str | None, cert: str | None, key: str | None, server_name: str | None) -> grpc.Channel:
    if not ca:
        return grpc.insecure_channel(address)
    with open(ca, "rb") as fh:
        root = fh.read()
    pair: tuple[bytes | None, bytes | None] = (None, None)
    if cert and key:
        with open(key, "rb") as k, open(cert, "rb") as c:
            pair = (k.read(), c.read())
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root, *pair), options=options)


def check(address: str, services: list[str], timeout: float, *, ca: str | None = None, cert: str | None = None,
          key: str | None = None, server_name: str | None = None) -> list[str]:
    """Return one problem line per service that is not SERVING (empty list: healthy)."""
    problems: list[str] = []
    with _channel(address, ca, cert, key, server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            except grpc.RpcError as exc:
                problems.append(f"{address} {service or '<server>'}: {exc.code().name} {exc.details() or ''}".rstrip())
                continue
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                problems.append(f"{address} {service or '<server>'}: {status}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_address = f"127.0.0.1:{os.environ.get('FLYWHEEL_GRPC_PORT', '50050')}"
    parser.add_argument("--address", action="append", help=f"host:port to check (repeatable; default {default_address})")
    parser.add_argument("--service", action="append", default=None,
                        help="health service name to check (repeatable; default: the server as a whole)")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("FLYWHEEL_HEALTHCHECK_TIMEOUT_S", "3")))
    env = os.environ.get
    parser.add_argument("--tls-ca", default=env("FLYWHEEL_TLS_CA_FILE"), help="PEM CA: dial with TLS")
    parser.add_argument("--tls-cert", default=env("FLYWHEEL_TLS_CERT_FILE"), help="client certificate (mTLS)")
    parser.add_argument("--tls-key", default=env("FLYWHEEL_TLS_KEY_FILE"), help="client key (mTLS)")
    parser.add_argument("--server-name", default=env("FLYWHEEL_TLS_SERVER_NAME"),
                        help="name to check in the server certificate")
    args = parser.parse_args(argv)
    problems: list[str] = []
    for address in args.address or [default_address]:
        problems += check(address, args.service or [""], args.timeout, ca=args.tls_ca, cert=args.tls_cert,
                          key=args.tls_key, server_name=args.server_name)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

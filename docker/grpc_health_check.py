#!/usr/bin/env python3
"""Container health check: ask the service's gRPC health endpoint whether it is SERVING.

Used by the image's HEALTHCHECK, by docker compose and by the Helm chart's `helm test` pod
(Kubernetes probes use the kubelet's native gRPC probe instead). Exit 0 when every named
service reports SERVING, 1 otherwise (including connection errors and timeouts).

    grpc_health_check.py                                 # 127.0.0.1:$FLYWHEEL_GRPC_PORT, overall health
    grpc_health_check.py --address reward:50052 --service flywheel.v1.RewardService
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, services: list[str], timeout: float) -> list[str]:
    """Return one problem line per service that is not SERVING (empty list: healthy)."""
    problems: list[str] = []
    with grpc.insecure_channel(address) as channel:
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
    args = parser.parse_args(argv)
    problems: list[str] = []
    for address in args.address or [default_address]:
        problems += check(address, args.service or [""], args.timeout)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Real X.509 material for TLS tests, made with the openssl CLI: a CA and certificates it signs.

`make_pki(dir)` writes ca.crt/ca.key, server.crt/server.key (serverAuth + clientAuth, for
localhost / 127.0.0.1 and any extra names, as one service's identity) and client.crt/client.key
(clientAuth), plus other-ca.crt (an unrelated CA a client must not trust).
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(dir: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", dir / f"{name}.key", "-out", dir / f"{name}.crt",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _leaf(dir: Path, name: str, sans: list[str], usage: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
             "-keyout", dir / f"{name}.key", "-out", dir / f"{name}.csr")
    ext = dir / f"{name}.ext"
    lines = [f"extendedKeyUsage={usage}", "keyUsage=critical,digitalSignature"]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    ext.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", dir / f"{name}.csr", "-CA", dir / "ca.crt", "-CAkey", dir / "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", dir / f"{name}.crt")
    # Kafka reads PEM keys only as PKCS#8, which `req -newkey` already writes.


def make_pki(dir: Path, *, dns_names: tuple[str, ...] = ()) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    _ca(dir, "ca")
    _ca(dir, "other-ca")
    sans = ["DNS:localhost", "IP:127.0.0.1", *(f"DNS:{n}" for n in dns_names)]
    _leaf(dir, "server", sans, "serverAuth,clientAuth")
    _leaf(dir, "client", [], "clientAuth")
    return dir

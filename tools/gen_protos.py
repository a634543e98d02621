"""Generate Python stubs (+ mypy .pyi) from protos/ into services/.

`protos/flywheel/v1/x.proto` becomes the module `flywheel.v1.x_pb2`: generated code lives in its own
subpackage, apart from hand-written code, and is committed; tests/test_protos.py fails when it is stale.

    python tools/gen_protos.py            # regenerate in place
    python tools/gen_protos.py --out DIR  # generate elsewhere (used by the staleness test)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
DEFAULT_OUT = REPO / "services"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generated_files(out: Path) -> list[Path]:
    """Every file this script produces under `out` (for the staleness comparison)."""
    files = []
    for proto in proto_files():
        stem = out / proto.relative_to(PROTO_ROOT).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            candidate = stem.parent / (stem.name + suffix)
            if candidate.exists():
                files.append(candidate)
    return files


def generate(out: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    # protoc finds the mypy plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) on PATH.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    # Make every generated directory a package, and drop the version-dependent header
    # comment so regenerating with the same inputs is byte-identical.
    for proto in proto_files():
        pkg_dir = out / proto.relative_to(PROTO_ROOT).parent
        for d in [pkg_dir, *pkg_dir.parents]:
            if d == out or out not in d.parents:
                break
            init = d / "__init__.py"
            if not init.exists() and d.name != "flywheel":
                init.write_text('"""Generated protobuf and gRPC stubs (tools/gen_protos.py); do not edit."""\n')
    for f in generated_files(out):
        text = f.read_text()
        text = re.sub(r"^# Protobuf Python Version: .*\n", "", text, flags=re.M)
        f.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    generate(ns.out)
    print(f"generated {len(generated_files(ns.out))} files under {ns.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

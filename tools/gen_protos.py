"""Generates Python stubs (with .pyi) for every proto under protos/ into gen/.

The output folders mirror the proto packages, so `from speechmesh.asr.v1 import asr_pb2`
works once gen/ is on the path. Re-runs regenerate only when a proto is newer than its stub.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "gen"


def _stale(protos: list[Path]) -> bool:
    for proto in protos:
        stub = OUT / proto.relative_to(PROTO_ROOT).with_name(proto.stem + "_pb2.py")
        if not stub.exists() or stub.stat().st_mtime < proto.stat().st_mtime:
            return True
    return False


def main() -> int:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not _stale(protos) and "--force" not in sys.argv:
        return 0
    OUT.mkdir(exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    code = protoc.main(args)
    if code != 0:
        print("protoc failed", file=sys.stderr)
        return int(code)
    print(f"generated stubs for {len(protos)} protos into {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

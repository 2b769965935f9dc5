"""Generate the Python gRPC stubs from proto/ into foldserve/protocol/ (committed; a test checks for drift).

Run: python proto/generate.py [OUT_ROOT]   (default: the repository root)
"""
from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
FILES = ["foldserve/protocol/model_config.proto", "foldserve/protocol/grpc_service.proto"]


def generate(out_root: Path) -> list[Path]:
    out_root.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *FILES]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    outputs = []
    for f in FILES:
        stem = f[: -len(".proto")]
        outputs += [out_root / f"{stem}_pb2.py", out_root / f"{stem}_pb2.pyi"]
        if f.endswith("grpc_service.proto"):
            outputs.append(out_root / f"{stem}_pb2_grpc.py")
    return outputs


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for p in generate(out):
        print(p.relative_to(out))

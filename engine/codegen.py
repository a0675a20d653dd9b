"""Regenerates the committed Python gRPC code in ``engine/api`` from ``proto/``.

Run ``python -m engine.codegen`` after editing ``proto/stt/v1/stt.proto``;
``tests/test_codegen.py`` fails when the committed files drift from the proto.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILES = ("stt/v1/stt.proto",)
API_DIR = Path(__file__).resolve().parent / "api"
GENERATED_NAMES = ("stt_pb2.py", "stt_pb2.pyi", "stt_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (grpcio-tools) on ``proto/`` and writes flat modules into ``out_dir``."""
    import grpc_tools
    from grpc_tools import protoc

    staging = out_dir / "_staging"
    staging.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={staging}",
        f"--pyi_out={staging}",
        f"--grpc_python_out={staging}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(PROTO_FILES))
    written = []
    for name in GENERATED_NAMES:
        source = staging / "stt" / "v1" / name
        text = source.read_text()
        # protoc writes absolute imports ("from stt.v1 import stt_pb2"); the
        # modules live in engine.api, so make them package-relative.
        text = re.sub(r"^from stt\.v1 import", "from . import", text, flags=re.M)
        target = out_dir / name
        target.write_text(text)
        written.append(target)
    for leftover in sorted(staging.rglob("*"), reverse=True):
        leftover.unlink() if leftover.is_file() else leftover.rmdir()
    staging.rmdir()
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else API_DIR):
        print(path)

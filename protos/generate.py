"""Regenerate the Python modules of protos/*.proto (``make protos``).

``python -m protos.generate`` writes ps_pb2.py, ps_pb2.pyi and ps_pb2_grpc.py
beside the .proto files; ``--check`` only reports whether the committed
modules are out of date. The output depends on the grpcio-tools version,
which the ``dev`` extra pins.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def generated_names(proto: Path) -> list[str]:
    """The module files protoc writes for one .proto file."""
    stem = proto.stem
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every protos/*.proto, writing under out_root/protos/."""
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    for proto in protos:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(proto.relative_to(ROOT)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto.name}")
    return [out_root / "protos" / name for p in protos for name in generated_names(p)]


def stale_modules() -> list[str]:
    """Names of generated modules that differ from a fresh protoc run."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            f.name
            for f in fresh
            if not (PROTO_DIR / f.name).exists()
            or (PROTO_DIR / f.name).read_bytes() != f.read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale modules")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_modules()
        if stale:
            print(f"out of date with protos/*.proto: {', '.join(stale)} (run `make protos`)")
            return 1
        print("generated modules are up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for f in generate(Path(tmp)):
            shutil.copyfile(f, PROTO_DIR / f.name)
            print(f"wrote protos/{f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the committed Python code of protos/ into client/weightcache/v1/.

python tools/gen_protos.py            # write the files
python tools/gen_protos.py --check    # exit 1 if the committed files differ
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "client"
GENERATED = ("weightcache_pb2.py", "weightcache_pb2.pyi", "weightcache_pb2_grpc.py")


def generate(out: Path) -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if not args.check:
        generate(OUT_ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        drift = [
            name
            for name in GENERATED
            if not (OUT_ROOT / "weightcache/v1" / name).exists()
            or not filecmp.cmp(Path(tmp) / "weightcache/v1" / name, OUT_ROOT / "weightcache/v1" / name, shallow=False)
        ]
    if drift:
        print(f"generated code is stale: {', '.join(drift)}; run python tools/gen_protos.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

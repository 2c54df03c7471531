"""Regenerate the gRPC stubs from `serve/proto/*.proto` (`make protos`).

The `.proto` sources live in `serve/proto/`; the stubs are generated under the package path
`flying_jax/serving/proto/`, so they import each other as `flying_jax.serving.proto.X_pb2`. The
wire names (proto packages `flying_jax.v1` and `jetstream_proto`) do not depend on that path.
Needs `grpcio-tools` (the `test` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "serve" / "proto"
PACKAGE_PATH = "flying_jax/serving/proto"


def generate(out_root: Path = ROOT) -> list[Path]:
  """Write the stubs under `out_root / PACKAGE_PATH`; returns the files written."""
  from grpc_tools import protoc  # a build-time tool, imported only here

  protos = sorted(SOURCES.glob("*.proto"))
  out = Path(out_root)
  (out / PACKAGE_PATH).mkdir(parents=True, exist_ok=True)
  args = ["protoc", f"-I{PACKAGE_PATH}={SOURCES}", f"--python_out={out}", f"--pyi_out={out}",
          f"--grpc_python_out={out}"] + [str(p) for p in protos]
  if protoc.main(args) != 0:
    raise RuntimeError(f"protoc failed on {[p.name for p in protos]}")
  return sorted((out / PACKAGE_PATH).glob("*_pb2*.py*"))


def main() -> int:
  for path in generate():
    print(path.relative_to(ROOT))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Start-up time of an engine in a fresh process: `python -m flying_jax.bench.startup ...`.

Cold (empty cache) and warm (filled cache: the engine's serialized executables) start-ups are
measured in child processes that share one cache directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(model: str, mesh: str, widths, cache_dir: str) -> float:
  """Seconds from process start to an engine with every width compiled and warmed."""
  cmd = [sys.executable, "-m", "flying_jax.bench.startup", "--model", model, "--mesh", mesh,
         "--widths", ",".join(map(str, widths)), "--cache-dir", cache_dir]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
  return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> int:
  t0 = time.perf_counter()
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--model", required=True)
  p.add_argument("--mesh", required=True)
  p.add_argument("--widths", required=True)
  p.add_argument("--cache-dir", required=True)
  args = p.parse_args()
  from flying_jax.cli import cpu_environment
  cpu_environment()
  from flying_jax.config import load_mesh_preset, load_model_card
  from flying_jax.engine.engine import Engine
  from flying_jax.engine.setup import EngineConfig

  widths = tuple(int(w) for w in args.widths.split(","))
  engine = Engine(load_model_card(args.model), load_mesh_preset(args.mesh),
                  EngineConfig(widths=widths, cache_dir=args.cache_dir))
  print(json.dumps({"seconds": time.perf_counter() - t0, "report": engine.report.lines()}))
  return 0


if __name__ == "__main__":
  sys.exit(main())

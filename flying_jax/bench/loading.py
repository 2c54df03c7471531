"""Host memory while loading weights: `flying-jax bench-load`.

Writes a Llama-shaped checkpoint of random weights (bf16 safetensors, one file per layer; ~1.1B
parameters by default), then loads it in fresh processes, each on one CPU device, two ways:

  stream  the engine's loader: one tensor read, converted and placed at a time;
  whole   the old path: every tensor stacked into canonical float32 first, then laid out, then
          placed.

Each child samples its anonymous resident memory (RssAnon: what the process allocated, not the
checkpoint's file pages it maps, which the kernel can drop) every millisecond: before loading
(baseline), its peak while loading, and after the weights are placed. On a CPU the placed
weights live in host memory too, so what loading itself costs is the peak above the baseline
minus the placed weights: the loader's overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

SHAPES = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "head_dim": 64,
          "ffn_dim": 8192, "vocab_size": 32000}


def arch_of(**overrides):
  from flying_jax.config import Architecture

  shape = {**SHAPES, **overrides}
  return Architecture(**shape, rope_theta=500000.0, norm_eps=1e-5, tied_embeddings=False,
                      max_context=4096)


def write(arch, path: str, dtype: str = "bfloat16", seed: int = 0) -> str:
  from flying_jax.checkpoints.random_init import iter_random
  from flying_jax.checkpoints.safetensors_reader import write_safetensors_stream

  write_safetensors_stream(iter_random(arch, seed), arch, path, dtype)
  return path


def _anon() -> int:
  """This process's anonymous resident memory in bytes (RssAnon)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1]) * 1024
  raise OSError("no RssAnon in /proc/self/status")


class _Peak:
  """The highest RssAnon seen by a thread sampling every millisecond."""

  def __init__(self):
    self.peak, self._stop = _anon(), threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _anon())
      time.sleep(0.001)

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return max(self.peak, _anon())


def measure_here(path: str, way: str, dtype: str) -> dict:
  """Load `path` in this process (one CPU device) and report its memory (bytes)."""
  import jax
  import numpy as np
  from flying_jax.parallel import MeshSpecs, mesh_for_width

  from flying_jax.checkpoints.safetensors_reader import (architecture_from_hf_config,
                                                         iter_safetensors_dir,
                                                         load_safetensors_dir)
  from flying_jax.model import weights as W

  arch = architecture_from_hf_config(json.loads(open(os.path.join(path, "config.json")).read()))
  specs = MeshSpecs(mesh_for_width(jax.devices()[:1], 1))
  replicated = specs.replicated()
  jax.block_until_ready(jax.device_put(np.zeros(4), replicated))
  base, sampler = _anon(), _Peak()
  if way == "stream":
    weights = W.load_resident(iter_safetensors_dir(path, arch), arch, dtype, None,
                              lambda a, _: jax.device_put(a, replicated).block_until_ready())
  else:
    weights = W.place(W.resident_layout(load_safetensors_dir(path, arch), arch, dtype), arch,
                      specs)
  jax.block_until_ready(weights)
  peak, after = sampler.stop(), _anon()
  leaves = jax.tree.leaves(weights)
  checksum = sum(float(np.asarray(x, np.float32).astype(np.float64).sum()) for x in leaves)
  return {"way": way, "baseline": base, "peak": peak, "after": after,
          "weights": weights.nbytes(), "largest_tensor": max(x.nbytes for x in leaves),
          "checksum": checksum}


def measure(path: str, way: str, dtype: str = "bfloat16") -> dict:
  """`measure_here` in a fresh process (its peak is its own)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "flying_jax.bench.loading", "--measure", path,
                        "--way", way, "--dtype", dtype], capture_output=True, text=True, env=env,
                       check=True, timeout=1800)
  return json.loads(out.stdout.strip().splitlines()[-1])


def overhead(r: dict) -> int:
  """Host bytes the loader needed beyond the weights it placed (at its peak)."""
  return r["peak"] - r["baseline"] - r["weights"]


def table(results: list[dict]) -> str:
  mib = lambda b: f"{b / 2**20:,.0f} MiB"
  lines = ["| loader | weights placed | peak above baseline | loader overhead | overhead / "
           "weights | overhead / largest tensor |", "|---|---|---|---|---|---|"]
  for r in results:
    o = overhead(r)
    lines.append(f"| {r['way']} | {mib(r['weights'])} | {mib(r['peak'] - r['baseline'])} | "
                 f"{mib(o)} | {o / r['weights']:.2f} | {o / r['largest_tensor']:.1f} |")
  return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--checkpoint", default=None,
                 help="an existing Llama safetensors directory (default: write a random one of "
                      "the shapes below to a temporary directory)")
  for name, value in SHAPES.items():
    p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                 help="the checkpoint's and the resident weights' dtype")
  p.add_argument("--json", default=None, help="also write the figures to this JSON file")


def run_bench_load(args) -> int:
  with tempfile.TemporaryDirectory() as tmp:
    path = args.checkpoint
    if path is None:
      arch = arch_of(**{k: getattr(args, k) for k in SHAPES})
      print(f"writing a random {arch.param_count() / 1e9:.2f}B-parameter {args.dtype} "
            f"checkpoint...", file=sys.stderr)
      path = write(arch, os.path.join(tmp, "ckpt"), args.dtype)
    results = [measure(path, way, args.dtype) for way in ("stream", "whole")]
  print(table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--measure", required=True)
  p.add_argument("--way", choices=["stream", "whole"], required=True)
  p.add_argument("--dtype", default="bfloat16")
  args = p.parse_args()
  print(json.dumps(measure_here(args.measure, args.way, args.dtype)))
  return 0


if __name__ == "__main__":
  sys.exit(main())

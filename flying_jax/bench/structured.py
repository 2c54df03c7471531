"""What structured output costs an engine step: median step time with every row free against
every row constrained (a regex, a JSON Schema), and the host time per token mask.

    flying-jax bench-structured --batches 1,8,64 --steps 20

Builds one engine (SmolLM2-135M on cpu-8 by default, width 1, one decode bucket so every batch
runs the same step program), then per batch size decodes that many sequences and times
`Engine.step()` once every sequence decodes (each call launches one step and collects the one
before: the steady state of serving). EOS is banned (`min_tokens`) and the constraints cannot
end within the run, so each step masks every row. `defer_masks` off is measured too: a step then
waits for the previous one's tokens before computing its masks and launching. Each figure is the
least of `repeats` medians, the runs interleaved (a shared machine's load comes and goes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from flying_jax.sampling.params import SamplingParams, StructuredOutputsParams

KINDS = {
    "free": None,
    "regex": StructuredOutputsParams(regex=r"[a-z ,.]+"),
    "json": StructuredOutputsParams(json={"type": "array", "minItems": 64,
                                          "items": {"type": "string", "maxLength": 12}}),
}


def build(model: str = "smollm2-135m", mesh: str = "cpu-8", decode: int = 8):
  """An `LLM` at width 1 with one decode bucket of `decode` slots per group."""
  from flying_jax import LLM
  from flying_jax.config import load_mesh_preset
  from flying_jax.presets.from_hf import toml_value

  preset = dataclasses.replace(load_mesh_preset(mesh), name=f"{mesh}-overhead",
                               decode_buckets=(decode,), partitions=())
  path = Path(tempfile.mkdtemp()) / "mesh.toml"
  path.write_text("".join(f"{f.name} = {toml_value(getattr(preset, f.name))}\n"
                          for f in dataclasses.fields(preset)))
  return LLM(model=model, mesh=str(path), widths=(1,), width=1, progress=False)


def step_time(llm, kind: str, batch: int, steps: int, defer: bool = True) -> dict:
  """Median seconds per `Engine.step()` while `batch` sequences decode under `kind`, and the
  host seconds per mask (0 for free rows)."""
  engine = llm.engine
  saved = engine.config
  engine.config = dataclasses.replace(saved, defer_masks=defer)
  params = SamplingParams(temperature=0.0, max_tokens=steps + 64, min_tokens=steps + 64,
                          structured_outputs=KINDS[kind])
  fill, masked = engine.outputs.fill_masks, [0.0, 0]

  def timed(rows, out):
    t0 = time.perf_counter()
    n = fill(rows, out)
    masked[0] += time.perf_counter() - t0
    masked[1] += n
    return n

  engine.outputs.fill_masks = timed
  prompt = llm.tokenizer.encode_prompt("Write a long list of words:")
  ids = [f"overhead-{kind}-{batch}-{i}-{time.monotonic_ns()}" for i in range(batch)]
  try:
    seqs = [s for rid in ids for s in engine.add_request(rid, prompt, params)]
    while engine.has_unfinished() and not all(s.output_ids for s in seqs):
      engine.step()
    masked[:] = [0.0, 0]
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      engine.step()
      times.append(time.perf_counter() - t0)
    per_mask = masked[0] / masked[1] if masked[1] else 0.0
  finally:
    for rid in ids:
      engine.abort(rid)
    while engine.has_unfinished():
      engine.step()
    del engine.outputs.fill_masks
    engine.config = saved
  return {"kind": kind, "batch": batch, "defer_masks": defer,
          "median_step_s": statistics.median(times), "mask_host_s": per_mask}


def measure(llm, batches=(1, 8, 64), steps: int = 20, repeats: int = 2) -> list[dict]:
  """`step_time` of every kind at every batch size (the constrained ones with and without
  deferred masks), the least of `repeats` interleaved runs."""
  runs = [(kind, batch, True) for batch in batches for kind in KINDS]
  runs += [(kind, batch, False) for batch in batches for kind in KINDS if KINDS[kind]]
  best: dict = {}
  for _ in range(repeats):
    for kind, batch, defer in runs:
      got = step_time(llm, kind, batch, steps, defer)
      key = (kind, batch, defer)
      if key not in best or got["median_step_s"] < best[key]["median_step_s"]:
        best[key] = got
  return sorted(best.values(), key=lambda r: (r["batch"], list(KINDS).index(r["kind"]),
                                              not r["defer_masks"]))


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--mesh", default="cpu-8")
  p.add_argument("--batches", default="1,8,64", help="comma-separated sequences decoding")
  p.add_argument("--steps", type=int, default=20, help="steps timed per run")
  p.add_argument("--repeats", type=int, default=2, help="interleaved runs (the least median)")
  p.add_argument("--decode", type=int, default=8, help="decode slots per group")
  p.add_argument("--json", default=None, help="also write the figures to this file")


def run_bench_structured(args) -> int:
  llm = build(args.model, args.mesh, args.decode)
  rows = measure(llm, [int(b) for b in args.batches.split(",")], args.steps, args.repeats)
  free = {r["batch"]: r["median_step_s"] for r in rows if r["kind"] == "free"}
  print(f"{'batch':>5} {'kind':>6} {'defer':>5} {'step ms':>8} {'vs free':>7} {'mask us':>8}")
  for r in rows:
    print(f"{r['batch']:>5} {r['kind']:>6} {str(r['defer_masks']):>5} "
          f"{1e3 * r['median_step_s']:>8.1f} {r['median_step_s'] / free[r['batch']]:>7.2f} "
          f"{1e6 * r['mask_host_s']:>8.1f}")
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=1))
  return 0

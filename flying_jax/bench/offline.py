"""`flying-jax bench-offline`: throughput, decode step time, host overhead and start-up time.

For every width of the mesh (and for a single-device preset, the baseline a small machine should
beat) it measures, in one run:
  - output tokens/s generating `--output-tokens` for `--prompts` prompts (greedy, no early stop);
  - the median time of a pure decode step with `--batches` sequences running (default 1, 8, 32;
    a batch larger than the preset's biggest decode bucket has no pure decode step: "-");
  - the host's share of a step (scheduling, packing, transfers and dispatch, before the wait) and
    the share spent blocked inside dispatch (enqueueing the programs: on an accelerator this
    should be small; where it is large the device makes the host wait inside the step);
  - start-up time with every width compiled, cold (empty compilation cache) and warm
    (`--no-startup` skips it).
`--json FILE` writes every figure.
"""

from __future__ import annotations

import gc
import json
import platform
import tempfile
import time

import numpy as np

from flying_jax.bench import startup
from flying_jax.config import default_mesh_name, load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.sampling import SamplingParams

BATCHES = (1, 8, 32)


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(100, min(vocab, 30000), size=int(rng.integers(8, 64))).tolist()
          for _ in range(n)]


def _drain(engine: Engine):
  while engine.has_unfinished():
    engine.step()


def throughput(engine: Engine, prompts, output_tokens: int) -> dict:
  params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
  base = f"tp-{time.monotonic_ns()}"
  t0 = time.perf_counter()
  for i, p in enumerate(prompts):
    engine.add_request(f"{base}-{i}", p, params)
  _drain(engine)
  dt = time.perf_counter() - t0
  for i in range(len(prompts)):
    engine.release(f"{base}-{i}")
  return {"output_tok_s": len(prompts) * output_tokens / dt, "seconds": dt}


def decode_steps(engine: Engine, batch: int, vocab: int) -> dict:
  """Median pure-decode step with exactly `batch` sequences decoding."""
  params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
  base = f"dec-{batch}-{time.monotonic_ns()}"
  prompts = _prompts(batch, vocab, seed=batch)
  before = engine.steps
  for i, p in enumerate(prompts):
    engine.add_request(f"{base}-{i}", p[:8], params)
  _drain(engine)
  recent = list(engine.timings)[-(engine.steps - before):]
  steps = [t for t in recent if t.decoded == batch and t.tokens == batch]
  for i in range(batch):
    engine.release(f"{base}-{i}")
  if not steps:
    return {"step_ms": None, "host_share": None, "steps": 0}
  total = np.array([t.total_s for t in steps])
  host = np.array([t.host_s for t in steps])
  disp = np.array([t.dispatch_s for t in steps])
  return {"step_ms": float(np.median(total) * 1e3), "host_ms": float(np.median(host) * 1e3),
          "dispatch_ms": float(np.median(disp) * 1e3),
          "host_share": float(np.median(host / total)),
          "dispatch_share": float(np.median(disp / total)), "steps": len(steps)}


def bench_mesh(card, preset, widths, prompts, output_tokens: int, batches=BATCHES,
               measure_startup: bool = True, attention: str = "auto",
               overlap: bool = True) -> dict:
  out = {"mesh": preset.name, "widths": {}}
  if measure_startup:
    with tempfile.TemporaryDirectory() as cache:
      out["startup_cold_s"] = startup.measure(card.name, preset.name, widths, cache)
      out["startup_warm_s"] = startup.measure(card.name, preset.name, widths, cache)
  engine = Engine(card, preset, EngineConfig(widths=widths, attention=attention, overlap=overlap,
                                             prefix_cache=False))    # prompts repeat per width
  out["attention"], out["overlap"] = engine.report.attention, engine.overlap
  biggest = max(preset.decode_buckets)
  for w in widths:
    engine.set_width(w)
    row = {"throughput": throughput(engine, prompts, output_tokens)}
    for b in batches:
      row[f"decode_b{b}"] = (decode_steps(engine, b, card.arch.vocab_size) if b <= biggest else
                             {"step_ms": None, "host_share": None, "steps": 0})
    out["widths"][w] = row
    print(_row_line(preset.name, w, row, batches), flush=True)
  del engine
  gc.collect()
  return out


def _row_line(mesh: str, w: int, row: dict, batches=BATCHES) -> str:
  cells = [f"{mesh:>10} w={w}", f"{row['throughput']['output_tok_s']:8.1f} tok/s"]
  for b in batches:
    d = row[f"decode_b{b}"]
    cells.append("b%-2d %s" % (b, "-" if d["step_ms"] is None else
                               f"{d['step_ms']:7.1f} ms (host {100 * d['host_share']:4.1f}%, "
                               f"dispatch {100 * d['dispatch_share']:4.1f}%)"))
  return " | ".join(cells)


def run_bench(args) -> int:
  card = load_model_card(args.model)
  preset = load_mesh_preset(args.mesh or default_mesh_name())
  single_name = args.single_mesh or ("cpu-1" if preset.platform == "cpu" else "gpu-1")
  widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else preset.widths
  prompts = _prompts(args.prompts, card.arch.vocab_size)
  batches = tuple(int(b) for b in args.batches.split(","))
  print(f"bench-offline: {card.name}, {args.prompts} prompts x {args.output_tokens} output tokens, "
        f"greedy; machine: {platform.machine()} {platform.processor() or ''}".strip())
  print(f"mesh/width | output tok/s | decode step (median) at batch "
        f"{' / '.join(map(str, batches))} (host share, blocked in dispatch); steps "
        f"{'one at a time' if args.no_overlap else 'overlapped'}")
  result = {"model": card.name, "prompts": args.prompts, "output_tokens": args.output_tokens,
            "machine": platform.platform(), "runs": []}
  runs = [(preset, widths)]
  if single_name != "none" and single_name != preset.name:
    single = load_mesh_preset(single_name)
    runs.append((single, single.widths))
  for p, ws in runs:
    r = bench_mesh(card, p, ws, prompts, args.output_tokens, batches, not args.no_startup,
                   args.attention, not args.no_overlap)
    if not args.no_startup:
      print(f"{p.name}: start-up with widths {list(ws)} compiled: cold "
            f"{r['startup_cold_s']:.1f} s, warm {r['startup_warm_s']:.1f} s", flush=True)
    result["runs"].append(r)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1, default=str)
  return 0


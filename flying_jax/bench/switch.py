"""`flying-jax bench-switch`: what a partition switch costs, per strategy.

On the given mesh, with every width compiled, it measures while requests decode:
  - cutover: from the decision to the first step dispatched in the new partition, split into the
    host bookkeeping of the switch and that first step (median and p99 over many switches);
  - bytes moved: weights (checked through buffer pointers: always 0) and KV (0 for pause and drain;
    recompute moves none but recomputes the KV of every in-flight token, reported as tokens and
    the bytes that prefill rewrites);
  - the price of recompute for one request: time to prefill a context of 256, 1024 and 4096 tokens
    in the new layout (migration, the alternative, is not implemented yet).
"""

from __future__ import annotations

import itertools
import json
import platform
import time

import numpy as np

from flying_jax.config import default_mesh_name, load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig, capacity_tokens
from flying_jax.sampling import SamplingParams

_ids = itertools.count()


def _kv_bytes_per_token(engine: Engine) -> int:
  a = engine.card.arch
  return 2 * a.n_layers * a.n_kv_heads * a.head_dim * np.dtype(engine.preset.dtype).itemsize


def _start_decoding(engine: Engine, n: int, prompt_len: int, max_tokens: int) -> list[str]:
  rng = np.random.default_rng(0)
  params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
  rids = []
  for _ in range(n):
    rid = f"sw-{next(_ids)}"
    vocab = engine.card.arch.vocab_size
    engine.add_request(rid, rng.integers(0, vocab, size=prompt_len).tolist(), params)
    rids.append(rid)
  while engine.scheduler.waiting or any(not s.is_decoding for g in engine.scheduler.running
                                        for s in g):
    engine.step()
  return rids


def _finish(engine: Engine, rids):
  for rid in rids:
    engine.abort(rid)
  while engine.has_unfinished():
    engine.step()


def cutovers(engine: Engine, strategy: str, switches: int, requests: int) -> dict:
  widths = sorted(engine.setups)
  host, first, inflight_tokens = [], [], []
  pointers = engine.weights.buffer_pointers()
  room = min(capacity_tokens(engine.card, ws, engine.pages) for ws in engine.setups.values()) - 33
  rids = _start_decoding(engine, requests, 32, min(room, 8 * switches + 64)
                         if strategy != "drain" else 8)
  for k in range(switches):
    target = widths[(widths.index(engine.width) + 1) % len(widths)]
    inflight_tokens.append(sum(s.computed for g in engine.scheduler.running for s in g))
    t0 = time.perf_counter()
    rec = engine.switch(target, strategy, reason="bench")
    while engine.width != target:               # drain: steps of the old partition first
      engine.step()
    t1 = time.perf_counter()
    steps = engine.steps
    engine.step()
    host.append(rec.cutover_s)
    if engine.steps > steps:                    # the new partition had work to run
      first.append(time.perf_counter() - t1 + (t1 - t0 - rec.cutover_s if strategy != "drain" else 0))
    if strategy == "drain":
      _finish(engine, rids)
      rids = _start_decoding(engine, requests, 32, 8)
  _finish(engine, rids)
  moved = engine.weights.buffer_pointers() != pointers
  kv = _kv_bytes_per_token(engine)
  return {
      "switches": switches,
      "host_ms_median": 1e3 * float(np.median(host)), "host_ms_p99": 1e3 * float(np.percentile(host, 99)),
      "first_steps_with_work": len(first),
      "first_step_ms_median": 1e3 * float(np.median(first)) if first else None,
      "first_step_ms_p99": 1e3 * float(np.percentile(first, 99)) if first else None,
      "weight_bytes_moved": "changed!" if moved else 0,
      "kv_bytes_moved": 0,
      "kv_tokens_recomputed_per_switch": float(np.mean(inflight_tokens)) if strategy == "recompute" else 0,
      "kv_bytes_rewritten_per_switch": float(np.mean(inflight_tokens)) * kv
      if strategy == "recompute" else 0,
  }


def recompute_cost(engine: Engine, width: int, context: int) -> float | None:
  """Seconds to prefill `context` tokens of one request at `width` (None: one group cannot hold it)."""
  if capacity_tokens(engine.card, engine.setups[width], engine.pages) < context + 1:
    return None
  engine.set_width(width)
  rid = f"rc-{next(_ids)}"
  prompt = np.random.default_rng(context).integers(0, engine.card.arch.vocab_size,
                                                    size=context).tolist()
  t0 = time.perf_counter()
  engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
  while engine.has_unfinished():
    engine.step()
  dt = time.perf_counter() - t0
  engine.release(rid)
  return dt


def run_bench_switch(args) -> int:
  card = load_model_card(args.model)
  preset = load_mesh_preset(args.mesh or default_mesh_name())
  engine = Engine(card, preset, EngineConfig())
  print(f"bench-switch: {card.name} on {preset.name} (widths {list(engine.setups)}), "
        f"{args.requests} requests decoding, {args.switches} switches per strategy; machine: "
        f"{platform.machine()}")
  result = {"model": card.name, "mesh": preset.name, "machine": platform.platform(),
            "strategies": {}, "recompute_s": {}}
  for strategy in ("pause", "recompute", "drain"):
    r = cutovers(engine, strategy, args.switches, args.requests)
    result["strategies"][strategy] = r
    first = ("no work in the new partition" if not r["first_steps_with_work"] else
             f"{r['first_step_ms_median']:.1f} ms median / {r['first_step_ms_p99']:.1f} ms p99 "
             f"({r['first_steps_with_work']} switches)")
    print(f"{strategy:>9}: cutover host {r['host_ms_median']:.3f} ms median / "
          f"{r['host_ms_p99']:.3f} ms p99, first step {first}; weight bytes moved "
          f"{r['weight_bytes_moved']}, "
          f"KV bytes moved 0, KV rewritten by prefill "
          f"{r['kv_bytes_rewritten_per_switch'] / 2**20:.1f} MiB per switch", flush=True)
  wide = max(engine.setups)
  for ctx in (256, 1024, 4096):
    dt = recompute_cost(engine, wide, ctx)
    result["recompute_s"][ctx] = dt
    print(f"recompute {ctx:>5} tokens at width {wide}: "
          + ("does not fit" if dt is None else f"{dt:.2f} s") + "; migrate: not implemented yet",
          flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0

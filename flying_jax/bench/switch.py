"""`flying-jax bench-switch`: what a partition switch costs, per strategy.

On the given mesh, with every width and the preset's mixed partitions compiled, it cycles through
all partitions while requests decode and measures:
  - cutover: from the decision to the first step dispatched in the new partition, split into the
    host bookkeeping of the switch and that first step (median and p99 over many switches; the
    host part also apart for switches between uniform partitions, and for those that start or end
    a mixed one, which re-cut the per-span views of the KV pools);
  - bytes moved: weights (checked through buffer pointers: always 0) and KV (0 for pause and drain;
    recompute moves none but recomputes the KV of every in-flight token, reported as tokens and
    the bytes that prefill rewrites);
  - recompute against migrate for one request holding 256, 1024 and 4096 tokens: the time to
    prefill it again in the new layout, and the time to re-lay its KV there.
"""

from __future__ import annotations

import itertools
import json
import platform
import time

import jax
import numpy as np

from flying_jax.config import default_mesh_name, load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
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
  names = list(engine.partitions)
  host, first, inflight_tokens, moved_elements = [], [], [], []
  host_uniform, host_mixed = [], []
  pointers = engine.weights.buffer_pointers()
  room = min(ws.capacity for ws in engine.setups.values()) - 33
  rids = _start_decoding(engine, requests, 32, min(room, 8 * switches + 64)
                         if strategy != "drain" else 8)
  for k in range(switches):
    source = engine.partition
    target = names[(names.index(source.name) + 1) % len(names)]
    inflight_tokens.append(sum(s.computed for g in engine.scheduler.running for s in g))
    t0 = time.perf_counter()
    rec = engine.switch(target, strategy, reason="bench")
    while engine.partition.name != target:      # drain: steps of the old partition first
      engine.step()
    t1 = time.perf_counter()
    steps = engine.steps
    engine.step()
    host.append(rec.cutover_s)
    uniform = source.uniform_width is not None and engine.partition.uniform_width is not None
    (host_uniform if uniform else host_mixed).append(rec.cutover_s)
    moved_elements.append(rec.migrated_elements)
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
      "host_ms_median_uniform": 1e3 * float(np.median(host_uniform)) if host_uniform else None,
      "host_ms_median_mixed": 1e3 * float(np.median(host_mixed)) if host_mixed else None,
      "first_steps_with_work": len(first),
      "first_step_ms_median": 1e3 * float(np.median(first)) if first else None,
      "first_step_ms_p99": 1e3 * float(np.percentile(first, 99)) if first else None,
      "weight_bytes_moved": "changed!" if moved else 0,
      "kv_bytes_moved": float(np.mean(moved_elements)) * 2 * engine.card.arch.n_layers
      * np.dtype(engine.preset.dtype).itemsize,
      "kv_tokens_recomputed_per_switch": float(np.mean(inflight_tokens)) if strategy == "recompute" else 0,
      "kv_bytes_rewritten_per_switch": float(np.mean(inflight_tokens)) * kv
      if strategy == "recompute" else 0,
  }


def recompute_cost(engine: Engine, width: int, context: int) -> float | None:
  """Seconds to prefill `context` tokens of one request at `width` (None: one group cannot hold it)."""
  if engine.setups[width].capacity < context + 1:
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


def migrate_cost(engine: Engine, from_width: int, to_width: int, context: int) -> float | None:
  """Seconds to migrate one request holding `context` tokens of KV (None: it does not fit)."""
  if min(engine.setups[w].capacity for w in (from_width, to_width)) < context + 2:
    return None
  engine.set_width(from_width)
  rid = f"mg-{next(_ids)}"
  prompt = np.random.default_rng(context).integers(0, engine.card.arch.vocab_size,
                                                    size=context).tolist()
  engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
  (seq,) = engine.request(rid)
  while not seq.is_decoding or seq.computed < context:
    engine.step()
  jax.block_until_ready(engine.device_pools.k)
  t0 = time.perf_counter()
  record = engine.switch(to_width, "migrate", reason="bench")
  jax.block_until_ready((engine.device_pools.k, engine.device_pools.v))
  dt = time.perf_counter() - t0
  assert record.migrated == 1
  _finish(engine, [rid])
  return dt


def run_bench_switch(args) -> int:
  card = load_model_card(args.model)
  preset = load_mesh_preset(args.mesh or default_mesh_name())
  engine = Engine(card, preset, EngineConfig(prefix_cache=False))   # each prefill computed
  print(f"bench-switch: {card.name} on {preset.name} (partitions {', '.join(engine.partitions)}), "
        f"{args.requests} requests decoding, {args.switches} switches per strategy; machine: "
        f"{platform.machine()}")
  result = {"model": card.name, "mesh": preset.name, "machine": platform.platform(),
            "strategies": {}, "recompute_s": {}}
  for strategy in ("pause", "recompute", "migrate", "drain"):
    r = cutovers(engine, strategy, args.switches, args.requests)
    result["strategies"][strategy] = r
    first = ("no work in the new partition" if not r["first_steps_with_work"] else
             f"{r['first_step_ms_median']:.1f} ms median / {r['first_step_ms_p99']:.1f} ms p99 "
             f"({r['first_steps_with_work']} switches)")
    split = ""
    if r["host_ms_median_mixed"] is not None and r["host_ms_median_uniform"] is not None:
      split = (f" (uniform<->uniform {r['host_ms_median_uniform']:.3f} ms, to or from mixed "
               f"{r['host_ms_median_mixed']:.3f} ms)")
    print(f"{strategy:>9}: cutover host {r['host_ms_median']:.3f} ms median / "
          f"{r['host_ms_p99']:.3f} ms p99{split}, first step {first}; weight bytes moved "
          f"{r['weight_bytes_moved']}, "
          f"KV moved {r['kv_bytes_moved'] / 2**20:.1f} MiB, KV rewritten by prefill "
          f"{r['kv_bytes_rewritten_per_switch'] / 2**20:.1f} MiB per switch", flush=True)
  widths = sorted(engine.setups)
  wide, source = widths[-1], widths[-2] if len(widths) > 1 else widths[-1]
  result["migrate_s"] = {}
  for ctx in (256, 1024, 4096):
    rc = recompute_cost(engine, wide, ctx)
    mg = migrate_cost(engine, source, wide, ctx) if source != wide else None
    result["recompute_s"][ctx], result["migrate_s"][ctx] = rc, mg
    fmt = lambda x: "does not fit" if x is None else f"{x:.3f} s"
    ratio = f", migrate {rc / mg:.0f}x faster" if rc and mg else ""
    print(f"{ctx:>5} tokens into width {wide}: recompute {fmt(rc)}, migrate from width {source} "
          f"{fmt(mg)}{ratio}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0

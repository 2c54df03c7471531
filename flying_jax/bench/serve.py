"""`flying-jax bench-serve`: throughput and latency of a running server at fixed concurrency.

For each concurrency level (default 1, 8, 64) it keeps that many Generate streams open until
`--requests` have completed, each with a random prompt of `--input-tokens` token ids and exactly
`--output-tokens` generated tokens (ignore_eos), and reports requests/s, output tokens/s, and the
client-side time to first token and time per output token (after the first) as percentiles.
Without `--target` it starts a server on `--model` / `--mesh` in this process first.
"""

from __future__ import annotations

import asyncio
import json
import platform
import time

import numpy as np


async def _one(stub, pb, ids, out_tokens, timeout):
  req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                           sampling=pb.Sampling(temperature=0.0, max_tokens=out_tokens,
                                                ignore_eos=True))
  t0 = time.perf_counter()
  first = last = None
  n = 0
  async for r in stub.Generate(req, timeout=timeout):
    if r.token_ids:
      last = time.perf_counter()
      first = first or last
      n += len(r.token_ids)
  return {"ttft": first - t0, "e2e": last - t0, "tokens": n,
          "tpot": (last - first) / (n - 1) if n > 1 else None}


async def _level(target, concurrency, requests, in_tokens, out_tokens, vocab, seed, timeout):
  import grpc

  from flying_jax.serving.proto import flying_jax_pb2 as pb
  from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc

  rng = np.random.default_rng(seed)
  prompts = [rng.integers(0, vocab, size=in_tokens).tolist() for _ in range(requests)]
  results = []
  async with grpc.aio.insecure_channel(target) as ch:
    stub = pb_grpc.GenerationStub(ch)
    todo = iter(prompts)

    async def worker():
      for ids in todo:
        results.append(await _one(stub, pb, ids, out_tokens, timeout))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = time.perf_counter() - t0
  pct = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else None
  ttft = [r["ttft"] for r in results]
  tpot = [r["tpot"] for r in results if r["tpot"] is not None]
  tokens = sum(r["tokens"] for r in results)
  return {
      "concurrency": concurrency, "requests": len(results), "duration_s": duration,
      "requests_per_s": len(results) / duration, "output_tokens_per_s": tokens / duration,
      **{f"ttft_ms_p{q}": pct(ttft, q) for q in (50, 90, 99)},
      **{f"tpot_ms_p{q}": pct(tpot, q) for q in (50, 90, 99)},
  }


def run_bench_serve(args) -> int:
  import grpc

  from flying_jax.serving.proto import flying_jax_pb2 as pb
  from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc

  local = None
  target = args.target
  if target is None:
    from flying_jax.offline import LLM
    from flying_jax.serving.server import ServeConfig, Server, ServerThread

    llm = LLM(model=args.model, mesh=args.mesh, width=args.width, progress=False,
              policy=args.policy, widths="all" if args.width is None else None)
    local = ServerThread(Server(llm.engine, llm.tokenizer,
                                ServeConfig(port=0, max_waiting=10**6)))
    target = local.target
  try:
    with grpc.insecure_channel(target) as ch:
      info = pb_grpc.GenerationStub(ch).GetServerInfo(pb.ServerInfoRequest(), timeout=60)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"bench-serve: {info.model} on {info.mesh} ({info.devices} devices, policy "
          f"{info.policy}) at {target}; {args.input_tokens} prompt tokens, {args.output_tokens} "
          f"output tokens per request; machine: {platform.machine()}")
    print(f"{'streams':>7} {'requests':>8} {'req/s':>7} {'out tok/s':>9} "
          f"{'TTFT p50/p90/p99 ms':>22} {'TPOT p50/p90/p99 ms':>22}")
    out = {"model": info.model, "mesh": info.mesh, "machine": platform.platform(), "levels": []}
    for i, c in enumerate(levels):
      n = args.requests or max(16, 2 * c)
      if args.warmup:
        asyncio.run(_level(target, min(c, 8), min(c, 8), args.input_tokens, 4, info.vocab_size,
                           1000 + i, args.timeout))
      r = asyncio.run(_level(target, c, n, args.input_tokens, args.output_tokens,
                             info.vocab_size, i, args.timeout))
      out["levels"].append(r)
      f3 = lambda k: "/".join(f"{r[f'{k}_p{q}']:.0f}" if r[f"{k}_p{q}"] is not None else "-"
                              for q in (50, 90, 99))
      print(f"{c:>7} {r['requests']:>8} {r['requests_per_s']:>7.2f} "
            f"{r['output_tokens_per_s']:>9.1f} {f3('ttft_ms'):>22} {f3('tpot_ms'):>22}",
            flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
  finally:
    if local is not None:
      local.stop()
  return 0

"""`flying-jax bench-serve`: throughput and latency of a running server at fixed concurrency.

For each concurrency level (default 1, 8, 64) it keeps that many Generate streams open until
`--requests` have completed, each with a random prompt of `--input-tokens` token ids and exactly
`--output-tokens` generated tokens (ignore_eos), and reports requests/s, output tokens/s, and the
client-side time to first token and time per output token (after the first) as percentiles.
The requests go through `bench.load` and the figures through `bench.report`, as in
`flying-jax bench`.
Without `--target` it starts a server on `--model` / `--mesh` in this process first.
"""

from __future__ import annotations

import asyncio
import json
import platform

import numpy as np


def _level(target, concurrency, requests, in_tokens, out_tokens, vocab, seed, timeout,
           warmup) -> dict:
  """One concurrency level: `requests` requests all ready at t=0, `concurrency` in flight."""
  from flying_jax.bench import report, traces
  from flying_jax.bench.load import run_load

  arrivals = traces.synthetic(np.zeros(requests), f"fixed:{in_tokens}", f"fixed:{out_tokens}",
                              seed=seed)
  result = asyncio.run(run_load(target, arrivals, vocab, max_concurrency=concurrency,
                                warmup=warmup, timeout=timeout, seed=seed, poll_interval=3600))
  s = report.summarize(result.records)
  ms = lambda key, stat: None if np.isnan(s[key][stat]) else s[key][stat]
  return {
      "concurrency": concurrency, "requests": s["completed"], "failed": s["failed"],
      "duration_s": s["duration_s"], "requests_per_s": s["request_throughput"],
      "output_tokens_per_s": s["output_throughput"],
      **{f"ttft_ms_p{q}": ms("ttft_ms", stat) for q, stat in ((50, "median"), (90, "p90"),
                                                              (99, "p99"))},
      **{f"tpot_ms_p{q}": ms("tpot_ms", stat) for q, stat in ((50, "median"), (90, "p90"),
                                                              (99, "p99"))},
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
      r = _level(target, c, n, args.input_tokens, args.output_tokens, info.vocab_size, i,
                 args.timeout, min(c, 8) if args.warmup else 0)
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

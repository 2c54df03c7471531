"""`flying-jax bench` and `flying-jax bench compare`: a workload against a server, with figures.

`bench` runs one workload and prints vLLM's table, writes the figures and every request's timings
as JSON (`--json`) and a timeline PNG (`--plot`). `bench compare` runs the same workload against
static DP (`static:1`), static TP (`static:<widest>`) and the `auto` policy on one server, setting
the policy through the Admin service between runs, and prints the figures side by side with
their ratios to static DP. Without `--target` a server is started in this process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import platform
import secrets
import time

import grpc

from flying_jax.bench import report, traces
from flying_jax.bench.load import LoadResult, run_load
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc


class _Local:
  """A server in this process (when no --target is given), with an admin token for compare."""

  def __init__(self, args):
    from flying_jax.offline import LLM
    from flying_jax.serving.server import ServeConfig, Server, ServerThread

    self.llm = LLM(model=args.model, mesh=args.mesh, widths="all", progress=False,
                   policy=args.policy)
    self.token = secrets.token_hex(8)
    self.thread = ServerThread(Server(self.llm.engine, self.llm.tokenizer,
                                      ServeConfig(port=0, max_waiting=10**6,
                                                  admin_token=self.token, policy=args.policy)))

  def stop(self):
    self.thread.stop()


def _set_policy(target: str, token: str, policy: str):
  with grpc.insecure_channel(target) as ch:
    admin = pb_grpc.AdminStub(ch)
    md = [("authorization", f"Bearer {token}")]
    admin.SetPolicy(pb.SetPolicyRequest(policy=policy), metadata=md, timeout=60)
    stub = pb_grpc.GenerationStub(ch)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:         # let the previous run's tail drain
      s = stub.GetStats(pb.StatsRequest(), timeout=60)
      if s.running == 0 and s.waiting == 0:
        return
      time.sleep(0.2)


def _one_run(target, args, arrivals, info) -> tuple[LoadResult, dict]:
  result = asyncio.run(run_load(target, arrivals, info.vocab_size, api=args.api,
                                max_concurrency=args.max_concurrency, warmup=args.warmup,
                                timeout=args.timeout, seed=args.seed))
  slo = report.SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
  return result, report.summarize(result.records, slo)


def _dump(path, info, args, runs: dict):
  out = {"model": info.model, "mesh": info.mesh, "machine": platform.platform(),
         "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items()
                                                      if isinstance(v, (int, float, str, type(None)))},
         "runs": {}}
  for name, (result, summary) in runs.items():
    out["runs"][name] = {
        "summary": summary,
        "requests": [dataclasses.asdict(r) for r in result.records],
        "timeline": [dataclasses.asdict(s) for s in result.timeline]}
  with open(path, "w") as f:
    json.dump(out, f, indent=1)


def run_bench(args) -> int:
  local = _Local(args) if args.target is None else None
  target = args.target or local.thread.target
  try:
    with grpc.insecure_channel(target) as ch:
      info = pb_grpc.GenerationStub(ch).GetServerInfo(pb.ServerInfoRequest(), timeout=60)
    tokenizer = local.llm.tokenizer if local else None
    arrivals = traces.from_args(args, tokenizer)
    print(f"bench: {len(arrivals)} requests, {args.trace or args.arrival} arrivals, against "
          f"{info.model} on {info.mesh} at {target} ({args.api} API); machine: "
          f"{platform.machine()}", flush=True)
    if args.mode == "compare":
      token = local.token if local else args.admin_token
      if not token:
        raise ValueError("bench compare sets the policy through the Admin service: give "
                         "--admin-token (or leave out --target to start a server here)")
      widest = max(int(p) for p in info.partitions if p.isdigit())
      policies = {"static DP": "static:1", f"static TP{widest}": f"static:{widest}",
                  "auto": "auto"}
    else:
      policies = {info.policy: None}
    runs = {}
    for name, policy in policies.items():
      if policy is not None:
        _set_policy(target, token, policy)
      result, summary = _one_run(target, args, arrivals, info)
      runs[name] = (result, summary)
      print(report.table(summary, f"{name}"), flush=True)
      if args.plot:
        from flying_jax.bench.plot import timeline_png
        path = args.plot if len(policies) == 1 else args.plot.replace(
            ".png", f"-{policy.replace(':', '')}.png")
        timeline_png(result, path, f"{info.model} on {info.mesh}: {name}")
        print(f"timeline: {path}")
    if len(runs) > 1:
      print(compare_table(runs))
    if args.json:
      _dump(args.json, info, args, runs)
  except (ValueError, grpc.RpcError) as e:
    print(f"error: {e}")
    return 2
  finally:
    if local is not None:
      local.stop()
  return 0


def compare_table(runs: dict) -> str:
  names = list(runs)
  base = runs[names[0]][1]
  rows = [("Request throughput (req/s)", lambda s: s["request_throughput"], False),
          ("Output throughput (tok/s)", lambda s: s["output_throughput"], False),
          ("Median TTFT (ms)", lambda s: s["ttft_ms"]["median"], True),
          ("P90 TTFT (ms)", lambda s: s["ttft_ms"]["p90"], True),
          ("P99 TTFT (ms)", lambda s: s["ttft_ms"]["p99"], True),
          ("Median TPOT (ms)", lambda s: s["tpot_ms"]["median"], True),
          ("P90 TPOT (ms)", lambda s: s["tpot_ms"]["p90"], True),
          ("P99 E2E (ms)", lambda s: s["e2e_ms"]["p99"], True)]
  head = f"{'metric':<28}" + "".join(f"{n:>18}" for n in names) + "".join(
      f"{n + ' vs DP':>20}" for n in names[1:])
  lines = [head, "-" * len(head)]
  for label, get, lower_better in rows:
    vals = [get(runs[n][1]) for n in names]
    b = get(base)
    ratios = []
    for v in vals[1:]:
      r = (b / v if lower_better else v / b) if v and b else float("nan")
      ratios.append(f"{r:>19.2f}x")
    lines.append(f"{label:<28}" + "".join(f"{v:>18.2f}" for v in vals) + "".join(ratios))
  lines.append("(ratios: how many times better than static DP)")
  return "\n".join(lines)


def add_arguments(p):
  """The flags of `flying-jax bench` (and `bench compare`)."""
  p.add_argument("mode", nargs="?", default="run", choices=["run", "compare", "peer"],
                 help="run (default): one workload; compare: the same workload under static DP, "
                      "static TP and auto; peer: offline tokens/s against transformers")
  p.add_argument("--target", default=None,
                 help="HOST:PORT of a running server (default: start one here on --model/--mesh)")
  p.add_argument("--api", default="flying", choices=["flying", "jetstream"],
                 help="flying-jax's Generation service or JetStream's Orchestrator.Decode")
  p.add_argument("--admin-token", default=None, help="the server's admin token (compare)")
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--mesh", default=None)
  p.add_argument("--policy", default="auto", help="policy of a server started here")
  traces.add_arguments(p)
  p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
  p.add_argument("--warmup", type=int, default=2, help="warm-up requests, not measured")
  p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT target")
  p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT target")
  p.add_argument("--slo-e2e-ms", type=float, default=None, help="goodput: end-to-end target")
  p.add_argument("--timeout", type=float, default=600.0, help="deadline of each request (s)")
  p.add_argument("--batch-sizes", default="1,8,32", help="peer: batch sizes")
  p.add_argument("--input-tokens", type=int, default=64, help="peer: prompt tokens per request")
  p.add_argument("--output-tokens", type=int, default=64, help="peer: output tokens per request")
  p.add_argument("--json", default=None, help="write every figure and request timing here")
  p.add_argument("--plot", default=None, help="write the timeline PNG here")

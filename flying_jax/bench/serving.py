"""`flying-jax bench` and `flying-jax bench compare`: a workload against a server, with figures.

`bench` runs one workload and prints vLLM's table, writes the figures and every request's timings
as JSON (`--json`) and a timeline PNG (`--plot`). `bench compare` runs the same workload against
static DP (`static:1`), static TP (`static:<widest>`) and the `auto` policy on one server, setting
the policy through the Admin service between runs, and prints the figures side by side with
their ratios to static DP. Without `--target` a server is started in this process.

`--api openai` sends the workload as streamed `/v1/completions` to an OpenAI-compatible HTTP
server (flying-jax's `--http-port`, or vLLM); compare then sets the policy through the HTTP
admin routes. `--shared-prefix-tokens N` starts every prompt with the same N tokens;
`bench prefix` runs the workload on a server started here without the prefix cache, then on one
with it (`--no-prefix-cache` turns it off for `run` and `compare`), and prints both with the
cache's hit rate and its gain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import secrets
import time

import grpc

from flying_jax.bench import report, traces
from flying_jax.bench.load import LoadResult, OpenAITarget, run_load, shared_prefix
from flying_jax.bench.openai_client import HttpError, get_json, post_json
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc


class _Local:
  """A server in this process (when no --target is given), with an admin token for compare."""

  def __init__(self, args, prefix_cache: bool | None = None):
    from flying_jax.offline import LLM
    from flying_jax.serving.server import ServeConfig, Server, ServerThread

    cache = not args.no_prefix_cache if prefix_cache is None else prefix_cache
    self.llm = LLM(model=args.model, mesh=args.mesh, widths="all", progress=False,
                   policy=args.policy, enable_prefix_caching=cache)
    self.token = secrets.token_hex(8)
    http = 0 if args.api == "openai" else None
    self.thread = ServerThread(Server(self.llm.engine, self.llm.tokenizer,
                                      ServeConfig(port=0, max_waiting=10**6, http_port=http,
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


def _set_policy_http(target: str, token: str, policy: str):
  """compare over the HTTP API: the admin route, then the previous run's tail drained."""
  post_json(target, "/admin/policy", {"policy": policy}, token)
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:
    s = get_json(target, "/admin/stats", token)
    if int(s.get("running", 0)) == 0 and int(s.get("waiting", 0)) == 0:
      return
    time.sleep(0.2)


def _openai_info(target: str, args, local) -> pb.ServerInfo:
  """What the run needs to know of an OpenAI-compatible server: the served model from
  /v1/models; the rest from the admin routes when the token is known, else the vocabulary of the
  served model's card (or --model's) for the random prompts."""
  from google.protobuf.json_format import ParseDict

  from flying_jax.config import ConfigError, load_model_card

  if local is not None:
    return local.thread.server.info()
  model = get_json(target, "/v1/models", args.api_key)["data"][0]["id"]
  if args.admin_token:
    return ParseDict(get_json(target, "/admin/info", args.admin_token), pb.ServerInfo(),
                     ignore_unknown_fields=True)
  try:
    vocab = load_model_card(model).arch.vocab_size
  except (ConfigError, OSError):
    vocab = load_model_card(args.model).arch.vocab_size
  return pb.ServerInfo(model=model, mesh="unknown", vocab_size=vocab, policy="unknown")


def _one_run(target, args, arrivals, info, tokenizer=None) -> tuple[LoadResult, dict]:
  openai = OpenAITarget(target, info.model, args.api_key) if args.api == "openai" else None
  prefix = shared_prefix(args.shared_prefix_tokens, info.vocab_size, args.seed, tokenizer)
  result = asyncio.run(run_load(target, arrivals, info.vocab_size, api=args.api,
                                max_concurrency=args.max_concurrency, warmup=args.warmup,
                                timeout=args.timeout, seed=args.seed, openai=openai,
                                prefix=prefix))
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
  if args.mode == "prefix":
    return run_prefix(args)
  local = _Local(args) if args.target is None else None
  http = args.api == "openai"
  target = args.target or (local.thread.http_target if http else local.thread.target)
  try:
    if http:
      info = _openai_info(target, args, local)
    else:
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
        (_set_policy_http if http else _set_policy)(target, token, policy)
      result, summary = _one_run(target, args, arrivals, info, tokenizer)
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
  except (ValueError, grpc.RpcError, HttpError, OSError) as e:
    print(f"error: {e}")
    return 2
  finally:
    if local is not None:
      local.stop()
  return 0


def run_prefix(args) -> int:
  """The same workload on a server started here without the prefix cache, then with it."""
  if args.target is not None:
    print("error: bench prefix starts its own servers (one without the prefix cache, one with "
          "it): leave out --target")
    return 2
  runs, hit = {}, None
  try:
    for name, cache in (("no prefix cache", False), ("prefix cache", True)):
      local = _Local(args, prefix_cache=cache)
      try:
        target = local.thread.http_target if args.api == "openai" else local.thread.target
        info = local.thread.server.info()
        arrivals = traces.from_args(args, local.llm.tokenizer)
        if not runs:
          print(f"bench prefix: {len(arrivals)} requests, {args.trace or args.arrival} arrivals, "
                f"{args.shared_prefix_tokens} shared prompt tokens, on {info.model} "
                f"({info.mesh}, policy {args.policy}, {args.api} API); machine: "
                f"{platform.machine()}", flush=True)
        runs[name] = _one_run(target, args, arrivals, info, local.llm.tokenizer)
        print(report.table(runs[name][1], name), flush=True)
        if cache:
          hit = local.thread.server.loop.call(lambda e: e.stats()).result()[
              "prefix_cache_hit_rate"]
      finally:
        local.stop()
    print(compare_table(runs, "no prefix cache"))
    print(f"prefix cache hit rate: {100 * hit:.1f}% of prompt tokens")
    if args.json:
      _dump(args.json, info, args, runs)
  except (ValueError, grpc.RpcError, HttpError, OSError) as e:
    print(f"error: {e}")
    return 2
  return 0


def compare_table(runs: dict, base_name: str = "DP") -> str:
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
  w = max(18, *(len(n) + 2 for n in names))
  rw = max(20, *(len(n) + len(base_name) + 6 for n in names[1:]), 0)
  head = f"{'metric':<28}" + "".join(f"{n:>{w}}" for n in names) + "".join(
      f"{n + ' vs ' + base_name:>{rw}}" for n in names[1:])
  lines = [head, "-" * len(head)]
  for label, get, lower_better in rows:
    vals = [get(runs[n][1]) for n in names]
    b = get(base)
    ratios = []
    for v in vals[1:]:
      r = (b / v if lower_better else v / b) if v and b else float("nan")
      ratios.append(f"{r:>{rw - 1}.2f}x")
    lines.append(f"{label:<28}" + "".join(f"{v:>{w}.2f}" for v in vals) + "".join(ratios))
  lines.append(f"(ratios: how many times better than {'static DP' if base_name == 'DP' else base_name})")
  return "\n".join(lines)


def add_arguments(p):
  """The flags of `flying-jax bench` (and `bench compare`)."""
  p.add_argument("mode", nargs="?", default="run", choices=["run", "compare", "peer", "prefix"],
                 help="run (default): one workload; compare: the same workload under static DP, "
                      "static TP and auto; prefix: the same workload without and with the "
                      "prefix cache (use --shared-prefix-tokens); peer: offline tokens/s against "
                      "transformers")
  p.add_argument("--target", default=None,
                 help="HOST:PORT of a running server (default: start one here on --model/--mesh)")
  p.add_argument("--api", default="flying", choices=["flying", "jetstream", "openai"],
                 help="flying-jax's Generation service, JetStream's Orchestrator.Decode (both "
                      "gRPC), or streamed /v1/completions of an OpenAI-compatible HTTP server "
                      "(--target HOST:PORT of its HTTP API, as vLLM's --backend openai)")
  p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                 help="openai: the server's API key (default: $OPENAI_API_KEY)")
  p.add_argument("--admin-token", default=None, help="the server's admin token (compare)")
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--mesh", default=None)
  p.add_argument("--policy", default="auto", help="policy of a server started here")
  traces.add_arguments(p)
  p.add_argument("--shared-prefix-tokens", type=int, default=0, metavar="N",
                 help="every prompt starts with the same N tokens (random ids; their text for "
                      "text prompts), then its own --input-len tokens: what a prefix cache "
                      "saves (default: 0, no shared prefix)")
  p.add_argument("--no-prefix-cache", action="store_true",
                 help="a server started here runs without the prefix cache")
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

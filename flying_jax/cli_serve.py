"""`flying-jax serve` (a gRPC server on the real model, and its OpenAI-compatible HTTP API with
`--http-port`) and `flying-jax request` (its client)."""

from __future__ import annotations

import asyncio
import sys


def run_serve(args) -> int:
  from flying_jax.cluster.join import ClusterError, ClusterSpec, join
  from flying_jax.config import ConfigError
  from flying_jax.offline import LLM
  from flying_jax.serving.server import ServeConfig, Server, serve_forever, versions

  try:
    spec = ClusterSpec.from_args(args)
  except ClusterError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  cluster = join(spec) if spec is not None else None
  if cluster is not None:
    print(f"flying-jax: process {cluster.process_id} of {cluster.processes} joined",
          file=sys.stderr, flush=True)
  try:
    config = ServeConfig(
        host=args.host, port=args.port, max_waiting=args.max_waiting,
        max_prompt_tokens=args.max_prompt_tokens, default_max_tokens=args.default_max_tokens,
        max_message_bytes=args.max_message_bytes, admin_token=args.admin_token,
        tls_cert=args.tls_cert, tls_key=args.tls_key, metrics_port=args.metrics_port,
        drain_grace_s=args.drain_grace, policy=args.policy, http_port=args.http_port,
        http_host=args.http_host, api_key=args.api_key)
    every = args.width is None and args.partition is None
    print(f"flying-jax: loading {args.model} and compiling "
          f"{'every partition' if every else 'its partition'}...", file=sys.stderr, flush=True)
    cache = args.compile_cache
    if cluster is not None and cache is None:
      cache = ""          # processes do not share one executable cache (each compiles its own)
    llm = LLM(model=args.model, mesh=args.mesh, width=args.width, partition=args.partition,
              widths="all" if every or args.all_widths else None, cache_dir=cache,
              progress=sys.stderr.isatty(), policy=args.policy,
              attention=args.attention, overlap=not args.no_overlap,
              enable_prefix_caching=not args.no_prefix_cache)
    if cluster is not None and not cluster.leader:
      return _follow(llm, cluster)
    server = Server(llm.engine, llm.tokenizer, config, versions())
  except (ValueError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  channel = None
  if cluster is not None:
    from flying_jax.cluster.lockstep import Channel, lead

    channel = Channel(cluster.process_id, cluster.processes)
    lead(llm.engine, channel, on_failure=_cluster_failed)

  def ready(s):
    rep = llm.startup_report
    print(f"flying-jax: serving {args.model} on {config.host}:{s.port} "
          f"({'TLS' if config.tls_cert else 'plaintext'}; partitions "
          f"{', '.join(llm.engine.partitions)}; policy {llm.engine.policy.name}; start-up "
          f"{rep.total_s:.1f}s)" + (f"; metrics on http://{config.host}:{s.metrics_port}"
                                    f"/metrics" if s.metrics_port is not None else "")
          + (f"; OpenAI API on http://{config.http_host or config.host}:{s.http_port}/v1"
             if s.http_port is not None else ""), flush=True)
    print("flying-jax: ready", flush=True)

  code = 0
  try:
    asyncio.run(serve_forever(server, ready))
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    code = 1
  finally:
    if channel is not None:
      from flying_jax.cluster.lockstep import report, stop

      stop(channel, code)
      print(f"flying-jax: {report(channel, llm.engine)}", flush=True)
  return code


_FAILED = []


def _cluster_failed(message: str):
  """A step failed on the leader of a cluster (a process died, a collective broke): the engine
  fails the requests in flight with the error; the processes cannot go on in step, so stop
  (exit 3) once their streams had two seconds to carry it."""
  import os
  import threading

  if _FAILED:
    return
  _FAILED.append(message)
  print(f"error: a step failed across the cluster ({message}); stopping", file=sys.stderr,
        flush=True)
  threading.Timer(2.0, os._exit, args=(3,)).start()


def _follow(llm, cluster) -> int:
  """A follower: replay the leader's dispatches until it stops."""
  from flying_jax.cluster.lockstep import Channel, follow

  print(f"flying-jax: process {cluster.process_id} follows the leader "
        f"({len(llm.engine.partitions)} partitions compiled)", flush=True)
  _, code = follow(llm.engine, Channel(cluster.process_id, cluster.processes))
  print(f"flying-jax: process {cluster.process_id}: the leader stopped (exit {code})",
        flush=True)
  return code


def run_request(args) -> int:
  import grpc

  from flying_jax.serving.proto import flying_jax_pb2 as pb
  from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc

  sampling = pb.Sampling(
      n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
      min_p=args.min_p, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
      repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
      frequency_penalty=args.frequency_penalty, stop=args.stop)
  if args.seed is not None:
    sampling.seed = args.seed
  req = pb.GenerateRequest(sampling=sampling, priority=args.priority)
  if args.chat:
    req.chat.messages.add(role="user", content=args.prompt)
  else:
    req.text = args.prompt
  if args.tls_ca:
    with open(args.tls_ca, "rb") as f:
      channel = grpc.secure_channel(args.target, grpc.ssl_channel_credentials(f.read()))
  else:
    channel = grpc.insecure_channel(args.target)
  last = None
  try:
    with channel:
      for resp in pb_grpc.GenerationStub(channel).Generate(req, timeout=args.timeout):
        prefix = f"[{resp.index}] " if args.n > 1 and resp.text else ""
        sys.stdout.write(prefix + resp.text)
        sys.stdout.flush()
        last = resp
  except grpc.RpcError as e:
    print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
    return 1
  print()
  if args.usage and last is not None:
    t = last.timings
    print(f"finish {last.finish_reason}; prompt {last.usage.prompt_tokens} tokens, completion "
          f"{last.usage.completion_tokens}; queue {t.queue_s * 1e3:.0f} ms, first token "
          f"{t.time_to_first_token_s * 1e3:.0f} ms, total {t.elapsed_s:.2f} s", file=sys.stderr)
  return 0

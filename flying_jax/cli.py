"""The `flying-jax` command line: generate, serve, request, convert, bench, bench-offline,
bench-serve, bench-switch, bench-load, sim, list, card.

Entry point only: it sets up the simulated CPU devices (when the mesh is a CPU mesh) before JAX
creates its backend, parses flags into frozen configs and hands them to the library.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def cpu_environment(devices: int = 8):
  """Simulated CPU devices and enough XLA:CPU threads that collectives never deadlock; on GPUs,
  the decoder layers' weights read in place by the layer loop (see `accelerator_flags`).

  Must run before JAX creates its backend. It only affects the host platform, so it is harmless
  on GPU and TPU machines.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  os.environ["XLA_FLAGS"] = accelerator_flags(flags)
  os.environ.setdefault("PJRT_NPROC", "16")


def accelerator_flags(flags: str) -> str:
  """`flags` (XLA_FLAGS) with XLA:GPU's dynamic-slice fusion on, unless set: the step program's
  layer loop picks each layer's weights out of their stack with a dynamic slice, which XLA:GPU
  then hands to cuBLAS in place instead of copying it (newer XLA does so by default). Other
  backends ignore it."""
  if "xla_gpu_enable_dynamic_slice_fusion" in flags:
    return flags
  return f"{flags} --xla_gpu_enable_dynamic_slice_fusion=true".strip()


def _add_engine_flags(p: argparse.ArgumentParser):
  p.add_argument("--model", default="smollm2-135m", help="model card name or path (models/*.toml)")
  p.add_argument("--mesh", default=None,
                 help="mesh preset name or path (meshes/*.toml); default: cpu-8 without an "
                      "accelerator, else the platform's preset")
  p.add_argument("--width", type=int, default=None,
                 help="partition width: 1 = data parallel replicas, N = one tensor-parallel group "
                      "of N devices (default: the smallest width of the mesh)")
  p.add_argument("--partition", default=None,
                 help="serve a mixed partition of the mesh preset instead of a width, e.g. 4+1x4 "
                      "(one TP4 group beside four DP replicas) or 2+2+4")
  p.add_argument("--compile-cache", default=None,
                 help="where compiled programs persist between runs, as serialized "
                      "executables ('' to disable; default: "
                      "$XDG_CACHE_HOME/flying-jax/xla)")
  p.add_argument("--attention", default="auto", choices=("auto", "pallas", "xla"),
                 help="paged-attention backend: pallas (Triton kernel on GPUs, Mosaic on TPUs), "
                      "xla (the reference, a loop over KV blocks) or auto (default: pallas on "
                      "accelerators, xla on CPUs)")
  p.add_argument("--no-overlap", action="store_true",
                 help="run each step to its end before packing the next (by default the host "
                      "schedules and packs step n+1 while the device runs step n; greedy ids "
                      "are the same either way)")
  p.add_argument("--no-prefix-cache", action="store_true",
                 help="turn off automatic prefix caching (on by default: requests whose prompts "
                      "start with the same tokens share those KV pages and skip their prefill)")
  p.add_argument("--all-widths", action="store_true",
                 help="compile every width the mesh allows, not only --width")
  p.add_argument("--policy", default=None,
                 help="choose the partition every step: static:W (or static:4+1x4), load, "
                      "priority, memory or auto (needs --all-widths to have somewhere to switch "
                      "to; --all-widths also compiles the preset's mixed partitions)")


def _add_sampling_flags(p: argparse.ArgumentParser):
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--min-p", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--min-tokens", type=int, default=0)
  p.add_argument("--repetition-penalty", type=float, default=1.0)
  p.add_argument("--presence-penalty", type=float, default=0.0)
  p.add_argument("--frequency-penalty", type=float, default=0.0)
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  p.add_argument("-n", type=int, default=1, help="samples per prompt")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="flying-jax",
      description="flying-jax: serve LLMs with JAX, switching between data and tensor parallelism.")
  parser.add_argument("-v", "--verbose", action="store_true", help="log start-up details")
  parser.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                      help="a folder of model cards (*.toml) searched before the current "
                           "directory's models/ and the shipped cards (repeatable; also "
                           "$FLYING_JAX_MODELS_DIR)")
  parser.add_argument("--meshes-dir", action="append", default=[], metavar="DIR",
                      help="a folder of mesh presets (*.toml, hardware presets in its hardware/) "
                           "searched first (repeatable; also $FLYING_JAX_MESHES_DIR)")
  sub = parser.add_subparsers(dest="command", required=True)

  gen = sub.add_parser("generate", help="generate completions for prompts (offline)",
                       description="Generate a completion for each PROMPT and print it.")
  _add_engine_flags(gen)
  _add_sampling_flags(gen)
  from flying_jax.cli_generate import add_structured_flags     # argparse only: no JAX yet
  add_structured_flags(gen)
  gen.add_argument("--chat", action="store_true",
                   help="treat each prompt as a user message and apply the model's chat template")
  gen.add_argument("prompts", nargs="+", metavar="PROMPT")

  conv = sub.add_parser("convert", help="write an orbax checkpoint from GGUF or safetensors",
                        description="Convert a model card's weights (GGUF, safetensors or random) "
                                    "into an orbax checkpoint in the resident layout.")
  conv.add_argument("--model", default="smollm2-135m")
  conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  conv.add_argument("--output", required=True, help="checkpoint directory to create")
  conv.add_argument("--max-width", type=int, default=8,
                    help="the widest tensor-parallel group the checkpoint's layout serves (its "
                         "head rows are padded for every power-of-two width up to it)")

  bench = sub.add_parser("bench-offline", help="offline throughput and step-time benchmark",
                         description="Output tokens/s, decode step time at each --batches size, "
                                     "the host's share of a step and the share blocked in "
                                     "dispatch, and start-up time, for each width and for the "
                                     "single-device preset (cpu-1 / gpu-1).")
  bench.add_argument("--model", default="smollm2-135m")
  bench.add_argument("--mesh", default=None)
  bench.add_argument("--single-mesh", default=None,
                     help="the single-device preset to compare with (default: cpu-1 / gpu-1; "
                          "'none' to skip)")
  bench.add_argument("--prompts", type=int, default=64)
  bench.add_argument("--output-tokens", type=int, default=128)
  bench.add_argument("--widths", default=None, help="comma-separated widths (default: all)")
  bench.add_argument("--batches", default="1,8,32",
                     help="comma-separated decode batch sizes to time (default: 1,8,32; e.g. "
                          "1,16,64,256 on an accelerator)")
  bench.add_argument("--no-startup", action="store_true",
                     help="skip the cold and warm start-up measurements")
  bench.add_argument("--json", default=None, help="also write the figures to this JSON file")
  bench.add_argument("--attention", default="auto", choices=("auto", "pallas", "xla"),
                     help="paged-attention backend (see `serve --help`)")
  bench.add_argument("--no-overlap", action="store_true",
                     help="time steps run one at a time (see `serve --help`)")

  load = sub.add_parser(
      "bench-load", help="host memory while loading weights: streamed against whole-model",
      description="Write a Llama-shaped random checkpoint (bf16 safetensors, ~1.1B parameters "
                  "by default) and load it in fresh processes with the streaming loader and with "
                  "the whole-model path; print the peak host memory above the baseline and the "
                  "transient part (peak minus the settled state, where the placed weights sit).")
  from flying_jax.bench.loading import add_arguments as _load_args
  _load_args(load)

  sw = sub.add_parser("bench-switch", help="what a partition switch costs, per strategy",
                      description="Cutover time (host bookkeeping and first step in the new "
                                  "partition), bytes moved per strategy, and the time a recompute "
                                  "costs for 256, 1024 and 4096-token contexts.")
  sw.add_argument("--model", default="smollm2-135m")
  sw.add_argument("--mesh", default=None)
  sw.add_argument("--switches", type=int, default=20, help="switches measured per strategy")
  sw.add_argument("--requests", type=int, default=8, help="requests decoding during the switches")
  sw.add_argument("--json", default=None)

  st = sub.add_parser("bench-structured", help="what structured output costs a step",
                      description="Median step time with every decoding row free against every "
                                  "row constrained (a regex, a JSON Schema), with the token masks "
                                  "computed while the device runs (deferred sampling) and before "
                                  "each launch, and the host time per mask.")
  from flying_jax.bench.structured import add_arguments as _structured_args
  _structured_args(st)

  srv = sub.add_parser("serve", help="serve the model over gRPC",
                       description="Serve flying-jax's Generation and Admin services and "
                                   "JetStream's Orchestrator over gRPC, with health checking, "
                                   "reflection and Prometheus metrics. Compiles every partition "
                                   "of the mesh unless --width or --partition is given. SIGTERM "
                                   "drains: no new requests, running ones finish, exit 0.")
  _add_engine_flags(srv)
  srv.set_defaults(policy="auto")
  srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
  srv.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
  srv.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
  srv.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API on this port: "
                        "/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, "
                        "/version, /admin/* (0: any free port; default: no HTTP API)")
  srv.add_argument("--http-host", default=None,
                   help="address the HTTP API binds (default: --host)")
  srv.add_argument("--api-key", default=os.environ.get("FLYING_JAX_API_KEY"),
                   help="the HTTP API's /v1 routes want 'Authorization: Bearer KEY', as vLLM's "
                        "--api-key (default: $FLYING_JAX_API_KEY; unset: open)")
  srv.add_argument("--admin-token", default=os.environ.get("FLYING_JAX_ADMIN_TOKEN"),
                   help="enable the Admin service; calls must send 'authorization: Bearer TOKEN' "
                        "(default: $FLYING_JAX_ADMIN_TOKEN; unset: admin disabled)")
  srv.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
  srv.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
  srv.add_argument("--max-waiting", type=int, default=256,
                   help="bounded queue: requests beyond it get RESOURCE_EXHAUSTED")
  srv.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: the model's context)")
  srv.add_argument("--max-message-bytes", type=int, default=4 * 2**20)
  srv.add_argument("--default-max-tokens", type=int, default=64,
                   help="max_tokens of requests that do not set it")
  srv.add_argument("--drain-grace", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
  from flying_jax.cluster.join import add_flags as cluster_flags
  cluster_flags(srv)

  req = sub.add_parser("request", help="send one request to a server and stream the answer",
                       description="Stream a completion for PROMPT from a flying-jax server.")
  req.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
  req.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message")
  req.add_argument("--priority", type=int, default=0, help="> 0: latency-critical")
  req.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
  req.add_argument("--tls-ca", default=None, help="PEM root certificate of a TLS server")
  req.add_argument("--usage", action="store_true", help="print token counts and timings after")
  _add_sampling_flags(req)
  req.add_argument("prompt", metavar="PROMPT")

  from flying_jax.bench.serving import add_arguments as bench_arguments
  bench_arguments(sub.add_parser(
      "bench", help="a workload against a server: vLLM's table, JSON, timeline PNG; compare; "
                    "peer",
      description="Send a workload (Poisson, gamma, phased or diurnal arrivals, a trace, or "
                  "ShareGPT prompts) to a server and report vLLM's benchmark figures. 'bench "
                  "compare' runs it under static DP, static TP and the auto policy. 'bench peer' "
                  "generates the same prompts offline through Hugging Face transformers "
                  "(PyTorch CPU, the same GGUF weights) and flying-jax and compares tokens/s "
                  "(needs the peer extra)."))

  bs = sub.add_parser("bench-serve", help="throughput and latency of a server at 1/8/64 streams",
                      description="Keep N Generate streams open against a server (--target, or "
                                  "one started here on --model/--mesh) and report requests/s, "
                                  "output tokens/s, TTFT and TPOT percentiles per level.")
  bs.add_argument("--target", default=None, help="HOST:PORT of a running server")
  bs.add_argument("--model", default="smollm2-135m")
  bs.add_argument("--mesh", default=None)
  bs.add_argument("--width", type=int, default=None, help="serve one width (default: all)")
  bs.add_argument("--policy", default="auto", help="policy of the server started here")
  bs.add_argument("--concurrency", default="1,8,64", help="comma-separated stream counts")
  bs.add_argument("--requests", type=int, default=None,
                  help="requests per level (default: max(16, 2 x streams))")
  bs.add_argument("--input-tokens", type=int, default=64)
  bs.add_argument("--output-tokens", type=int, default=64)
  bs.add_argument("--timeout", type=float, default=600.0, help="deadline of each request")
  bs.add_argument("--no-warmup", dest="warmup", action="store_false",
                  help="skip the short warm-up requests before each level")
  bs.add_argument("--json", default=None)

  from flying_jax.sim.cli import add_arguments as sim_arguments
  sim_arguments(sub.add_parser(
      "sim", help="simulate serving on 8xH100/8xH200/TPU v5e-8/v6e-8 with the real scheduler",
      description="Drive the engine's own scheduler, policies and switch strategies with a "
                  "cost model of a hardware preset instead of running the model: vLLM's table "
                  "per policy, 'compare' for static DP / static TP / auto, '--scenario paper' "
                  "for the Flying Serving paper's experiment, 'calibrate' and 'validate' for "
                  "the cost model of this machine's CPU."))

  sub.add_parser("list", help="list model cards, mesh presets and hardware presets")

  card = sub.add_parser(
      "card", help="make a model card from a Hugging Face checkpoint directory",
      description="Read a Hugging Face checkpoint directory (config.json, *.safetensors, the "
                  "tokenizer) and write a model card for it: its architecture, its safetensors "
                  "as the weights, its tokenizer and stop ids.")
  card.add_argument("--from-hf", required=True, metavar="DIR",
                    help="the directory (config.json and *.safetensors)")
  card.add_argument("--name", default=None, help="the card's name (default: the folder's name)")
  card.add_argument("--output", default=None,
                    help="write the card to this .toml file (default: print it)")
  return parser


def _user_folders(args):
  """--models-dir / --meshes-dir go first in the search path of every later look-up."""
  for flag, env in ((args.models_dir, "FLYING_JAX_MODELS_DIR"),
                    (args.meshes_dir, "FLYING_JAX_MESHES_DIR")):
    if flag:
      folders = [os.path.abspath(f) for f in flag] + [os.environ.get(env, "")]
      os.environ[env] = os.pathsep.join(f for f in folders if f)


def _list() -> int:
  """Each model card, mesh preset and hardware preset, and where it was found."""
  from flying_jax import presets

  for kind, title in (("models", "models"), ("meshes", "meshes"),
                      ("hardware", "hardware (flying-jax sim)")):
    print(f"{title}:")
    for s in presets.entries(kind):
      print(f"  {s.name:<16} {s.origin:<24} {s.where}")
  return 0


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(message)s")
  _user_folders(args)
  if args.command == "list":
    return _list()
  if args.command == "card":
    from flying_jax.presets.from_hf import run_card
    return run_card(args)
  if args.command == "sim" and args.mode not in ("calibrate", "validate"):
    from flying_jax.sim.cli import run_sim            # no devices: the simulator runs no JAX
    return run_sim(args)
  if args.command == "request":                   # a client: no JAX
    from flying_jax.cli_serve import run_request
    return run_request(args)
  cpu_environment()
  if args.command == "generate":
    from flying_jax.cli_generate import run_generate
    return run_generate(args)
  if args.command == "serve":
    from flying_jax.cli_serve import run_serve
    return run_serve(args)
  if args.command == "convert":
    from flying_jax.checkpoints.orbax_store import run_convert
    return run_convert(args)
  if args.command == "bench-offline":
    from flying_jax.bench.offline import run_bench
    return run_bench(args)
  if args.command == "bench" and args.mode == "peer":
    from flying_jax.bench.peer import run_peer
    return run_peer(args)
  if args.command == "bench":
    from flying_jax.bench.serving import run_bench
    return run_bench(args)
  if args.command == "bench-serve":
    from flying_jax.bench.serve import run_bench_serve
    return run_bench_serve(args)
  if args.command == "sim":
    from flying_jax.sim.cli import run_sim
    return run_sim(args)
  if args.command == "bench-load":
    from flying_jax.bench.loading import run_bench_load
    return run_bench_load(args)
  if args.command == "bench-switch":
    from flying_jax.bench.switch import run_bench_switch
    return run_bench_switch(args)
  if args.command == "bench-structured":
    from flying_jax.bench.structured import run_bench_structured
    return run_bench_structured(args)
  return 2


if __name__ == "__main__":
  sys.exit(main())

"""`flying-jax generate`: offline completions printed to stdout."""

from __future__ import annotations

import sys

from flying_jax.engine.engine import RequestRejected
from flying_jax.sampling import SamplingParams


def sampling_from_args(args) -> SamplingParams:
  return SamplingParams(
      n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
      min_p=args.min_p, seed=args.seed, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
      repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
      frequency_penalty=args.frequency_penalty, stop=tuple(args.stop))


def run_generate(args) -> int:
  from flying_jax.config import ConfigError
  from flying_jax.offline import LLM

  try:
    params = sampling_from_args(args)
    width = args.width
    if width is None and args.partition is None and not args.all_widths:
      from flying_jax.config import default_mesh_name, load_mesh_preset
      width = min(load_mesh_preset(args.mesh or default_mesh_name()).widths)  # compile it only
    llm = LLM(model=args.model, mesh=args.mesh, width=width, partition=args.partition,
              widths="all" if args.all_widths else None,
              cache_dir=args.compile_cache, progress=sys.stderr.isatty(), policy=args.policy,
              attention=args.attention, overlap=not args.no_overlap)
  except (ValueError, ConfigError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    outs = llm.generate(args.prompts, params, chat=args.chat, use_tqdm=sys.stderr.isatty())
  except RequestRejected as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  many = len(outs) > 1 or params.n > 1
  for i, out in enumerate(outs):
    for c in out.outputs:
      if many:
        print(f"--- prompt {i}" + (f", sample {c.index}" if params.n > 1 else ""))
      print(c.text)
  return 0

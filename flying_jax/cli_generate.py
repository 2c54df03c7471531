"""`flying-jax generate`: offline completions printed to stdout.

Nothing here imports JAX at import time: `cli.build_parser` reads `add_structured_flags` before
the CPU devices are set up.
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def add_structured_flags(p: argparse.ArgumentParser):
  """Structured output: at most one constraint on the generated text."""
  g = p.add_argument_group("structured output (at most one)").add_mutually_exclusive_group()
  g.add_argument("--json-schema", metavar="FILE|JSON",
                 help="the output is JSON valid against this JSON Schema (a file, or JSON text)")
  g.add_argument("--json-object", action="store_true", help="the output is a JSON object")
  g.add_argument("--regex", help="the output matches this regular expression")
  g.add_argument("--choice", action="append", metavar="TEXT",
                 help="the output is one of these strings (repeatable)")
  g.add_argument("--grammar", metavar="FILE", help="the output follows this Lark grammar "
                 "(llguidance's dialect)")


def structured_from_args(args):
  """The `StructuredOutputsParams` the flags ask for, or None (ValueError when malformed)."""
  from flying_jax.sampling import StructuredOutputsParams

  text = lambda arg: pathlib.Path(arg).read_text(encoding="utf-8")
  if getattr(args, "json_schema", None):
    schema = args.json_schema
    return StructuredOutputsParams(json=schema if schema.lstrip().startswith("{")
                                   else text(schema))
  if getattr(args, "json_object", False):
    return StructuredOutputsParams(json_object=True)
  if getattr(args, "regex", None):
    return StructuredOutputsParams(regex=args.regex)
  if getattr(args, "choice", None):
    return StructuredOutputsParams(choice=tuple(args.choice))
  if getattr(args, "grammar", None):
    return StructuredOutputsParams(grammar=text(args.grammar))
  return None


def sampling_from_args(args):
  from flying_jax.sampling import SamplingParams

  return SamplingParams(
      n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
      min_p=args.min_p, seed=args.seed, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
      repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
      frequency_penalty=args.frequency_penalty, stop=tuple(args.stop),
      structured_outputs=structured_from_args(args))


def run_generate(args) -> int:
  from flying_jax.config import ConfigError
  from flying_jax.engine.engine import RequestRejected
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
              attention=args.attention, overlap=not args.no_overlap,
              enable_prefix_caching=not args.no_prefix_cache)
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

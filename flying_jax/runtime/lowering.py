"""The step programs of an engine lowered for an accelerator platform, without that accelerator.

JAX lowers for any platform it knows (`lowering_platforms`), so this CPU machine can check what a
GPU or TPU would be given: here, that no step program holds a while loop whose trip count is
computed on the device. On a GPU each iteration of such a loop sends its predicate back to the
host (the paged attention's walk over a run-time number of blocks did, in every layer); a loop
of static trip count (the walk over the layers, the sampler's 32 halvings) does not.
"""

from __future__ import annotations

import dataclasses
import re

import jax

from flying_jax.config import MeshPreset, ModelCard
from flying_jax.model import decoder
from flying_jax.model import weights as W
from flying_jax.model.heads import row_blocks
from flying_jax.runtime.programs import ProgramRegistry

_WHILE = re.compile(r"stablehlo\.while\(")
_CONST = re.compile(r"^\s*(%[\w#]+) = stablehlo\.constant dense<-?\d+> : tensor<i\d+>\s*$")
_COMPARE = re.compile(r"^\s*%[\w#]+ = stablehlo\.compare\s+(LT|LE|GT|GE|NE),\s*(%[\w#]+),\s*"
                      r"(%[\w#]+)(?:,\s*\w+)?\s*:\s*\(tensor<i\d+>, tensor<i\d+>\)")


def lower_steps(card: ModelCard, preset: MeshPreset, widths, platform: str, attention: str,
                devices=None, pages: int | None = None, local: bool = True) -> dict:
  """(span, "step", shape) -> the step program lowered for `platform` ("cuda", "rocm", "tpu"),
  and (span, "sample", None) -> the span's sampling program,
  for the uniform partition of each width in `widths` over `devices` (default: this machine's),
  with the paged-attention backend `attention`. `local`: a hybrid model's sliding layers keep
  pools of their own (as an engine does by default)."""
  from flying_jax.engine import setup as S

  devices = list(devices or jax.devices())
  cfg = S.EngineConfig(widths=tuple(widths), attention=attention, free_window_pages=local,
                       cache_dir="")
  pages = pages or cfg.pages_per_device or preset.pages_per_device
  spaces = S.page_spaces(card, preset, cfg, pages)
  rows = row_blocks(card.arch, sorted(widths), preset.base_width)
  setups = {}
  for w in widths:
    ws = S.width_setup(card, preset, devices, w, pages, blocks=rows,
                       local_tables=len(spaces) > 1)
    setups[ws.span] = ws
  dtype = S.dtype_of(preset)
  slots = preset.page_tokens * card.arch.n_kv_heads
  pools = [jax.ShapeDtypeStruct((len(layers), p, slots, card.arch.head_dim), dtype)
           for layers, p in spaces]
  first = next(iter(setups.values()))
  reg = ProgramRegistry(card.arch, dtype, setups, pools, cfg.hist_len, cfg.max_banned,
                        max(s.rows for ws in setups.values() for s in ws.shapes),
                        S.layer_walk(card, spaces), attention)
  reg.graphs = decoder.Graphs.of(decoder.abstract_model(card.arch, dtype, rows))
  wa = W.abstract(card.arch, dtype, first.specs, rows)
  out = {(ws.span, "step", shape): reg.lower(ws, shape, wa, (platform,))
         for ws in setups.values() for shape in ws.shapes}
  out.update({(ws.span, "sample", None): reg.lower(ws, None, wa, (platform,))
              for ws in setups.values()})
  return out


@dataclasses.dataclass(frozen=True)
class Loop:
  line: int                # where the while starts in the module text
  static: bool             # its condition compares a counter with a constant
  cond: str                # the condition region, for messages


def loops(text: str) -> list[Loop]:
  """Every `stablehlo.while` of a lowered module's text, and whether its trip count is static:
  the condition region holds only integer constants and one comparison of a loop-carried value
  with one of them (what `lax.fori_loop` / `lax.scan` with Python bounds lower to)."""
  lines = text.splitlines()
  out = []
  for i, line in enumerate(lines):
    if not _WHILE.search(line):
      continue
    j = i + 1
    while lines[j].strip() != "cond {":
      j += 1
    body = []
    j += 1
    while not lines[j].strip().startswith("} do {"):
      body.append(lines[j])
      j += 1
    consts = {m.group(1) for m in map(_CONST.match, body) if m}
    compares = [m for m in map(_COMPARE.match, body) if m]
    rest = [b for b in body if not (_CONST.match(b) or _COMPARE.match(b)
                                    or b.strip().startswith("stablehlo.return"))]
    static = (len(compares) == 1 and not rest and compares[0].group(3) in consts
              and "iterArg" in compares[0].group(2))
    out.append(Loop(i + 1, static, "\n".join(body)))
  return out


def dynamic_loops(text: str) -> list[Loop]:
  """The loops of `loops` whose trip count the device computes."""
  return [l for l in loops(text) if not l.static]

"""How a compiled program reads its weights, from its optimized HLO text.

A weight may be read whole (a GEMM operand, an elementwise operand of a norm vector) or as one
contiguous run of rows: a `dynamic-slice` or `slice` that keeps every dimension but the leading
one whole. Anything else on a weight of rank 2 or more (gather, transpose, copy, pad,
concatenate, a slice across a minor dimension) materialises a rearranged copy on every call and
is reported. `weight_reads` lists what each weight parameter goes into, following fusions into
their fused computations and through bitcasts. Backends differ in what a leading-axis slice costs
(XLA:CPU copies it to a temporary; XLA:GPU can feed it to cuBLAS in place): this check is about
the shape of the access, which is the layout's part.
"""

from __future__ import annotations

import dataclasses
import re

_INSTR = re.compile(r"^\s*(ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>\S+(?:\s*\{[^}]*\})?)\s+"
                    r"(?P<op>[\w\-]+)\((?P<args>[^)]*)\)(?P<attrs>.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_SHAPE = re.compile(r"\[([\d,]*)\]")
_PASS = {"bitcast", "reshape", "get-tuple-element"}
_READS = {"dot", "convolution", "custom-call"}
_BAD = {"gather", "transpose", "copy", "pad", "concatenate", "reverse", "sort", "scatter"}


@dataclasses.dataclass(frozen=True)
class Read:
  weight: str            # the parameter's name in the program (its op_name metadata)
  op: str                # the HLO opcode that consumes it
  kind: str              # "whole", "rows" (contiguous leading slice) or "copy"


@dataclasses.dataclass
class _Instr:
  name: str
  op: str
  shape: tuple[int, ...]
  args: list[str]
  attrs: str


def _shape(type_text: str) -> tuple[int, ...]:
  m = _SHAPE.search(type_text)
  return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def _parse(hlo: str) -> tuple[dict[str, list[_Instr]], str]:
  comps, current, entry = {}, None, ""
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m:
      current = m.group("name")
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      args = [a.strip().lstrip("%") for a in m.group("args").split(",") if a.strip()]
      comps[current].append(_Instr(m.group("name"), m.group("op"), _shape(m.group("type")),
                                   args, m.group("attrs")))
  return comps, entry


def _users(instrs: list[_Instr], name: str) -> list[_Instr]:
  return [i for i in instrs if name in i.args]


def _classify(comps, instrs: list[_Instr], value: str, shape: tuple[int, ...], weight: str,
              out: list[Read]):
  for user in _users(instrs, value):
    if user.op in _PASS:
      _classify(comps, instrs, user.name, shape, weight, out)
    elif user.op == "fusion":
      callee = re.search(r"calls=%([\w.\-]+)", user.attrs).group(1)
      inner = comps[callee]
      k = user.args.index(value)
      param = next(i for i in inner if i.op == "parameter" and i.args == [str(k)])
      _classify(comps, inner, param.name, shape, weight, out)
    elif user.op in ("dynamic-slice", "slice"):
      rows = user.shape[1:] == shape[1:] and user.args[0] == value
      out.append(Read(weight, user.op, "rows" if rows else "copy"))
      if rows:
        _classify(comps, instrs, user.name, user.shape, weight, [])
    elif user.op in _BAD and len(shape) >= 2:
      out.append(Read(weight, user.op, "copy"))
    else:
      out.append(Read(weight, user.op, "whole"))


def weight_reads(hlo: str, is_weight=lambda name: name.startswith("layer_state")) -> list[Read]:
  """Every read of a weight parameter of the program's entry computation (parameters whose
  op_name metadata `is_weight`)."""
  comps, entry = _parse(hlo)
  out: list[Read] = []
  for instr in comps[entry]:
    if instr.op != "parameter":
      continue
    m = re.search(r'op_name="([^"]+)"', instr.attrs)
    if m and is_weight(m.group(1)):
      _classify(comps, comps[entry], instr.name, instr.shape, m.group(1), out)
  return out


def copies(hlo: str, is_weight=lambda name: name.startswith("layer_state")) -> list[Read]:
  """The reads of `weight_reads` that rearrange a weight (empty: none)."""
  return [r for r in weight_reads(hlo, is_weight) if r.kind == "copy"]

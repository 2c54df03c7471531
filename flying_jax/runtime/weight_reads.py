"""How a compiled program reads its weights, from its optimized HLO text.

A weight may be read whole (a GEMM operand, an elementwise operand of a norm vector) or as one
contiguous run of rows: a `dynamic-slice` or `slice` that keeps every dimension but the leading
one whole. Anything else on a weight of rank 2 or more (gather, transpose, copy, pad,
concatenate, a slice across a minor dimension) materialises a rearranged copy on every call and
is reported. `weight_reads` lists what each weight parameter goes into, following fusions into
their fused computations, bitcasts, and a stacked weight into the loop that walks the layers
(the pick of one layer, a leading-axis slice of size 1, is followed to that layer's reads). Backends differ in what a leading-axis slice costs
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


def _contiguous(part: tuple[int, ...], whole: tuple[int, ...]) -> bool:
  """A slice `part` of `whole` is one contiguous run: single entries of leading axes, then one
  partial axis, then whole axes (e.g. one layer's run of rows of a stacked weight)."""
  if len(part) != len(whole):
    return False
  i = next((i for i, n in enumerate(part) if n != 1), len(part))
  return part[i + 1:] == whole[i + 1:]


def _index(attrs: str) -> int:
  return int(re.search(r"index=(\d+)", attrs).group(1))


def _into_loop(comps, instrs: list[_Instr], tup: _Instr, k: int, shape, weight: str,
               out: list[Read]):
  """A weight handed to a while loop as element `k` of its initial tuple: its reads in the loop
  body (the body's parameter, element k). A tuple no loop takes (a body's ROOT handing the
  weight on to the next iteration) reads nothing."""
  for loop in _users(instrs, tup.name):
    if loop.op != "while":
      continue
    body = comps[re.search(r"body=%([\w.\-]+)", loop.attrs).group(1)]
    param = next(i for i in body if i.op == "parameter")
    for gte in _users(body, param.name):
      if gte.op == "get-tuple-element" and _index(gte.attrs) == k:
        _classify(comps, body, gte.name, shape, weight, out)


def _classify(comps, instrs: list[_Instr], value: str, shape: tuple[int, ...], weight: str,
              out: list[Read]):
  for user in _users(instrs, value):
    if user.op in _PASS:
      _classify(comps, instrs, user.name, user.shape or shape, weight, out)
    elif user.op == "tuple":
      _into_loop(comps, instrs, user, user.args.index(value), shape, weight, out)
    elif user.op == "fusion":
      callee = re.search(r"calls=%([\w.\-]+)", user.attrs).group(1)
      inner = comps[callee]
      k = user.args.index(value)
      param = next(i for i in inner if i.op == "parameter" and i.args == [str(k)])
      _classify(comps, inner, param.name, shape, weight, out)
    elif user.op in ("dynamic-slice", "slice"):
      rows = _contiguous(user.shape, shape) and user.args[0] == value
      if user.shape[1:] == shape[1:] and user.shape[0] == 1 < shape[0] and user.args[0] == value:
        # one layer of a stack: follow its reads
        _classify(comps, instrs, user.name, user.shape, weight, out)
        continue
      out.append(Read(weight, user.op, "rows" if rows else "copy"))
      if rows:
        _classify(comps, instrs, user.name, user.shape, weight, [])
    elif user.op in _BAD and len(shape) >= 2:
      out.append(Read(weight, user.op, "copy"))
    else:
      out.append(Read(weight, user.op, "whole"))


def weight_reads(hlo: str, is_weight=lambda name: name.startswith("weights.layers")) -> list[Read]:
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


def copies(hlo: str, is_weight=lambda name: name.startswith("weights.layers")) -> list[Read]:
  """The reads of `weight_reads` that rearrange a weight (empty: none)."""
  return [r for r in weight_reads(hlo, is_weight) if r.kind == "copy"]

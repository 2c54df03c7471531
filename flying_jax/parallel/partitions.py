"""Partitions of the devices into aligned groups, as values.

A partition lists the width of each group in device order: `(4, 1, 1, 1, 1)` is one TP4 group on
devices 0-3 beside four DP replicas on devices 4-7. Its name compresses runs of equal widths,
`"4+1x4"`; uniform partitions read `"1x8"` (DP8), `"2x4"`, `"4x2"`, `"8"` (TP8). Every group is
aligned (its first device is a multiple of its width) and widths are powers of two.

A *span* is a maximal run of groups of one width: the devices one compiled program covers. A
uniform partition is a single span over all devices; `"4+1x4"` has the spans (0-3, width 4) and
(4-7, width 1). Programs are compiled per span, so two partitions that share a span share its
programs.
"""

from __future__ import annotations

import dataclasses
import functools


class PartitionError(ValueError):
  """A partition that is malformed or does not fit the mesh."""


@dataclasses.dataclass(frozen=True, order=True)
class Span:
  first: int                  # first device
  devices: int                # devices covered
  width: int                  # width of each of its groups

  @property
  def groups(self) -> int:
    return self.devices // self.width

  def __str__(self) -> str:
    return f"w{self.width}@{self.first}-{self.first + self.devices - 1}"


@dataclasses.dataclass(frozen=True)
class Partition:
  widths: tuple[int, ...]     # group widths in device order

  # construction ------------------------------------------------------------------------------
  @staticmethod
  def uniform(devices: int, width: int) -> "Partition":
    if width < 1 or devices % width:
      raise PartitionError(f"width {width} does not divide {devices} devices")
    return Partition.of((width,) * (devices // width), devices)

  @staticmethod
  def of(widths, devices: int) -> "Partition":
    widths = tuple(int(w) for w in widths)
    first = 0
    for w in widths:
      if w < 1 or w & (w - 1):
        raise PartitionError(f"group width {w} is not a power of two")
      if first % w:
        raise PartitionError(f"a width-{w} group cannot start at device {first} (groups are "
                             f"aligned to their width)")
      first += w
    if first != devices:
      raise PartitionError(f"groups {'+'.join(map(str, widths))} cover {first} devices, the "
                           f"mesh has {devices}")
    return Partition(widths)

  @staticmethod
  def parse(spec: "str | int | Partition", devices: int) -> "Partition":
    """`8` or `"8"` (TP8), `"1x8"` (DP8), `"4+1x4"`, `"2+2+4"`: widths in device order.

    A bare integer is a uniform partition of that width.
    """
    if isinstance(spec, Partition):
      return Partition.of(spec.widths, devices)
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
      return Partition.uniform(devices, int(spec))
    widths: list[int] = []
    for term in str(spec).replace(" ", "").split("+"):
      w, _, k = term.partition("x")
      if not w.isdigit() or (k and not k.isdigit()):
        raise PartitionError(f"cannot read partition {spec!r}: terms are W or WxK (K groups of "
                             f"width W), joined by '+', e.g. 4+1x4")
      widths += [int(w)] * (int(k) if k else 1)
    return Partition.of(widths, devices)

  # views -------------------------------------------------------------------------------------
  @property
  def devices(self) -> int:
    return sum(self.widths)

  @property
  def uniform_width(self) -> int | None:
    return self.widths[0] if len(set(self.widths)) == 1 else None

  @functools.cached_property
  def groups(self) -> tuple[tuple[int, int], ...]:
    """(first device, width) of every group, in device order."""
    out, first = [], 0
    for w in self.widths:
      out.append((first, w))
      first += w
    return tuple(out)

  @functools.cached_property
  def spans(self) -> tuple[Span, ...]:
    out: list[Span] = []
    for first, w in self.groups:
      if out and out[-1].width == w:
        last = out[-1]
        out[-1] = Span(last.first, last.devices + w, w)
      else:
        out.append(Span(first, w, w))
    return tuple(out)

  @functools.cached_property
  def name(self) -> str:
    terms = []
    for s in self.spans:
      terms.append(str(s.width) if s.groups == 1 else f"{s.width}x{s.groups}")
    return "+".join(terms)

  def __str__(self) -> str:
    return self.name

"""Meshes for each partition width and the collectives a width-w group uses.

A width-w uniform partition views the N devices as a mesh of N/w groups (data parallel); a span
of a mixed partition views its own devices the same way. With base width t (an engine is t
devices holding one copy of the weights, each device 1/t of it), a group of w = m * t devices is
m engines merged, and the mesh is (groups, merge = m, shard = t) over the devices in their
natural order: device `(g * m + e) * t + j` is shard j of engine e of group g. Every width's mesh
holds the same devices in the same order, so a weight placed once (replicated, or split over the
`shard` axis) or a per-device KV pool is accepted by every width's program without a transfer.

Inside a group, a device's *rank* (`Collectives.index`) is `j * m + e`: rank-ordered slices of
any width nest inside the device's resident shard (the width-t slice j), which is what lets every
width read its weights as one contiguous run (`model.heads.row_blocks`). Host code that maps a
rank to a device uses `position_of_rank`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flying_jax.parallel.partitions import Span

_GROUPS, _MERGE, _SHARD = "dp", "merge", "shard"
_RANK = (_SHARD, _MERGE)          # a device's rank in its group: shard-major


def mesh_for_width(devices: Sequence[jax.Device], width: int, base: int = 1) -> Mesh:
  n = len(devices)
  if n % width or width % base:
    raise ValueError(f"width {width} does not divide {n} devices or is not a multiple of the "
                     f"base width {base}")
  grid = np.asarray(devices, dtype=object).reshape(n // width, width // base, base)
  return Mesh(grid, (_GROUPS, _MERGE, _SHARD), axis_types=(AxisType.Auto,) * 3)


def mesh_for_span(devices: Sequence[jax.Device], span: Span, base: int = 1) -> Mesh:
  """The (groups x merge x shard) mesh of the devices one span of a partition covers."""
  return mesh_for_width(list(devices)[span.first:span.first + span.devices], span.width, base)


def position_of_rank(rank: int, width: int, base: int = 1) -> int:
  """The device offset inside its group of the device with `rank` (`Collectives.index`)."""
  m = width // base
  return (rank % m) * base + rank // m


@dataclasses.dataclass(frozen=True)
class MeshSpecs:
  """Shardings of the kinds of arrays a program sees, on one width's mesh."""
  mesh: Mesh

  @property
  def width(self) -> int:
    return self.mesh.shape[_MERGE] * self.mesh.shape[_SHARD]

  @property
  def base(self) -> int:
    return self.mesh.shape[_SHARD]

  @property
  def groups(self) -> int:
    return self.mesh.shape[_GROUPS]

  # PartitionSpecs (for shard_map) --------------------------------------------------------------
  replicated_spec = P()
  per_group_spec = P(_GROUPS)             # leading axis: one entry per group
  per_device_spec = P((_GROUPS, _MERGE, _SHARD))  # leading axis: one entry per device

  @property
  def sharded_spec(self):
    """Leading axis split over an engine's devices (a weight's rows), replicated over engines;
    replicated when an engine is one device."""
    return P(_SHARD) if self.base > 1 else P()

  # NamedShardings (for placement and AOT lowering) -------------------------------------------
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.replicated_spec)

  def per_group(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.per_group_spec)

  def per_device(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.per_device_spec)

  def sharded(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.sharded_spec)


@dataclasses.dataclass(frozen=True)
class Collectives:
  """What model code may do across the devices of its group, without naming mesh axes."""
  width: int
  base: int = 1                   # devices per engine

  def shard_index(self):
    """Which shard of its engine's weights this device holds."""
    return jax.lax.axis_index(_SHARD) if self.base > 1 else 0

  def shard_sum(self, x):
    """Sum over the devices of this device's engine (the holders of one copy of the weights)."""
    return jax.lax.psum(x, _SHARD) if self.base > 1 else x

  def index(self):
    """This device's rank in its group (shard-major: see the module doc)."""
    return jax.lax.axis_index(_RANK)

  def sum(self, x):
    return jax.lax.psum(x, _RANK) if self.width > 1 else x

  def gather(self, x, axis: int):
    """Concatenate the group's blocks along `axis` in rank order."""
    return jax.lax.all_gather(x, _RANK, axis=axis, tiled=True) if self.width > 1 else x


def per_device(fn: Callable, specs: MeshSpecs, in_specs, out_specs) -> Callable:
  """Run `fn` once per device of the mesh, on its local blocks."""
  return jax.shard_map(fn, mesh=specs.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

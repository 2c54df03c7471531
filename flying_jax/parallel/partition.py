"""Meshes for each partition width and the collectives a width-w group uses.

A width-w uniform partition views the N devices as a (N/w) x w mesh (a span of a mixed partition
views its own devices the same way): the first axis enumerates
groups (data parallel), the second the devices inside a group (tensor parallel). Every width's mesh
holds the same devices in the same order, so a replicated weight or a per-device KV pool placed once
is accepted by every width's program without a transfer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flying_jax.parallel.partitions import Span

_GROUPS, _INNER = "dp", "tp"


def mesh_for_width(devices: Sequence[jax.Device], width: int) -> Mesh:
  n = len(devices)
  if n % width:
    raise ValueError(f"width {width} does not divide {n} devices")
  grid = np.asarray(devices, dtype=object).reshape(n // width, width)
  return Mesh(grid, (_GROUPS, _INNER), axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_for_span(devices: Sequence[jax.Device], span: Span) -> Mesh:
  """The (groups x width) mesh of the devices one span of a partition covers."""
  return mesh_for_width(list(devices)[span.first:span.first + span.devices], span.width)


@dataclasses.dataclass(frozen=True)
class MeshSpecs:
  """Shardings of the three kinds of arrays a program sees, on one width's mesh."""
  mesh: Mesh

  @property
  def width(self) -> int:
    return self.mesh.shape[_INNER]

  @property
  def groups(self) -> int:
    return self.mesh.shape[_GROUPS]

  # PartitionSpecs (for shard_map) --------------------------------------------------------------
  replicated_spec = P()
  per_group_spec = P(_GROUPS)             # leading axis: one entry per group
  per_device_spec = P((_GROUPS, _INNER))  # leading axis: one entry per device

  # NamedShardings (for placement and AOT lowering) -------------------------------------------
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.replicated_spec)

  def per_group(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.per_group_spec)

  def per_device(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.per_device_spec)


@dataclasses.dataclass(frozen=True)
class Collectives:
  """What model code may do across the devices of its group, without naming mesh axes."""
  width: int

  def index(self):
    return jax.lax.axis_index(_INNER)

  def sum(self, x):
    return jax.lax.psum(x, _INNER) if self.width > 1 else x

  def gather(self, x, axis: int):
    return jax.lax.all_gather(x, _INNER, axis=axis, tiled=True) if self.width > 1 else x


def per_device(fn: Callable, specs: MeshSpecs, in_specs, out_specs) -> Callable:
  """Run `fn` once per device of the mesh, on its local blocks."""
  return jax.shard_map(fn, mesh=specs.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

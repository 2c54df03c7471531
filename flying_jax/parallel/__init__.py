"""Meshes, partitions and collectives: the only code that knows physical mesh axis names."""

from flying_jax.parallel.partition import (Collectives, MeshSpecs, mesh_for_span, mesh_for_width,
                                           per_device, position_of_rank)
from flying_jax.parallel.partitions import Partition, PartitionError, Span

__all__ = ["Collectives", "MeshSpecs", "Partition", "PartitionError", "Span", "mesh_for_span",
           "mesh_for_width", "per_device", "position_of_rank"]

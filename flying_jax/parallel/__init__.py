"""Meshes, partitions and collectives: the only code that knows physical mesh axis names."""

from flying_jax.parallel.partition import Collectives, MeshSpecs, mesh_for_width, per_device

__all__ = ["Collectives", "MeshSpecs", "mesh_for_width", "per_device"]

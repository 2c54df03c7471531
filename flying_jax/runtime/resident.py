"""The resident weights and KV pools, and the views through which each span's programs read them.

Weights are placed once, each engine one copy (replicated, or split over an engine's devices);
KV pools once, one block per device. A
program of a uniform partition covers every device and reads those arrays as they are. A program
of one span of a mixed partition covers only the span's devices, so it reads *views*: arrays over
the span's mesh assembled from the very same per-device buffers
(`jax.make_array_from_single_device_arrays`), no byte copied. Weight views are made once at
start-up; the pools are split into per-span views when a mixed partition starts and merged back
into whole-mesh arrays when it ends (the step programs donate their pools, so only one set of
arrays owns the buffers at a time). A page space's pools are one stack of every layer's, split
over the devices along axis 1, so a switch assembles four arrays per page space, not four per
layer.
"""

from __future__ import annotations

import jax

from flying_jax.kv import DevicePools
from flying_jax.model.weights import lead, weight_shardings
from flying_jax.parallel import Span
from flying_jax.runtime.programs import WidthSetup

try:  # a private constructor: fall back to the public function if it moves
  from jax._src.array import ArrayImpl as _ArrayImpl
  from jax._src.core import ShapedArray as _ShapedArray
except ImportError:  # pragma: no cover
  _ArrayImpl = _ShapedArray = None



def _assemble(shape, sharding, arrays: list) -> jax.Array:
  """One array of `shape` on `sharding` from its per-device arrays, in mesh order (zero-copy).

  `jax.make_array_from_single_device_arrays` validates every shard (~30 us per array on this
  JAX; the weight views of every span are assembled at start-up), so the arrays are
  assembled directly when this JAX offers it, unchecked: the callers pass exactly the mesh's
  devices in order, with the shard shape the sharding implies.
  """
  if _ArrayImpl is not None:
    return _ArrayImpl(_ShapedArray(shape, arrays[0].dtype), sharding, arrays, committed=True,
                      _skip_checks=True)
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _buffers(array: jax.Array, first: int, n: int) -> list:
  """The single-device arrays of mesh positions first..first+n-1 of a sharded (not replicated)
  `array` whose sharding lists its devices in mesh order, as every sharding here does."""
  return [array.addressable_data(first + i) for i in range(n)]


def _view(array: jax.Array, sharding) -> jax.Array:
  """A weight's buffers on `sharding`'s devices, each device its own (its copy of a replicated
  weight, its shard of a split one: a span covers whole engines, so the global shape stays);
  start-up only: reading `addressable_shards` costs ~0.1 ms the first time."""
  by_device = {s.device: s.data for s in array.addressable_shards}
  return _assemble(array.shape, sharding, [by_device[d] for d in sharding.mesh.devices.flat])


class Resident:
  def __init__(self, weights, pools: DevicePools, setups: dict[Span, WidthSetup], devices: int,
               arch):
    self.pools = pools                    # whole-mesh pools (valid while not split)
    self.devices = devices
    self._shapes = [a.shape for a in pools.k]   # per page space [layers, devices * pages, ..]
    # ^ never change (a hybrid model's sliding layers have fewer pages than its global ones)
    self._full = next(ws for ws in setups.values() if ws.span.devices == devices)
    self._weights = {}
    for span, ws in setups.items():
      if span.devices == devices:
        self._weights[span] = weights
      else:
        shardings = weight_shardings(weights, arch, ws.specs.sharded(), ws.specs.replicated(),
                                     ws.plan.reads.vocab)
        self._weights[span] = jax.tree.map(_view, weights, shardings)
    self._setups = setups
    self._split: dict[Span, DevicePools] | None = None

  def weights_for(self, span: Span):
    return self._weights[span]

  def pools_for(self, span: Span) -> DevicePools:
    if self._split is None:
      if span.devices != self.devices:
        raise RuntimeError(f"the KV pools are not split for span {span}")
      return self.pools
    return self._split[span]

  def arrange(self, spans: tuple[Span, ...]):
    """Make the pools readable by the programs of `spans` (one partition's spans)."""
    if len(spans) == 1 and spans[0].devices == self.devices:
      self.merge()
    elif self._split is None or set(self._split) != set(spans):
      self.merge()
      self._split = {}
      for span in spans:
        per_device = lead(self._setups[span].specs.per_device())

        def cut(a):
          shape = (a.shape[0], a.shape[1] // self.devices * span.devices) + a.shape[2:]
          return _assemble(shape, per_device, _buffers(a, span.first, span.devices))
        self._split[span] = DevicePools([cut(a) for a in self.pools.k],
                                        [cut(a) for a in self.pools.v], self.pools.layers)
      for lst in (self.pools.k, self.pools.v):      # the span views own the buffers now
        lst[:] = [None] * len(lst)

  def merge(self) -> DevicePools:
    """Whole-mesh pools again (for a uniform partition, or to migrate); returns them."""
    if self._split is None:
      return self.pools
    per_device = lead(self._full.specs.per_device())
    order = sorted(self._split)                       # spans in device order
    for name in ("k", "v"):
      merged = getattr(self.pools, name)
      for space in range(len(merged)):
        bufs = [b for sp in order for b in _buffers(getattr(self._split[sp], name)[space], 0,
                                                       sp.devices)]
        merged[space] = _assemble(self._shapes[space], per_device, bufs)
    self._split = None
    return self.pools

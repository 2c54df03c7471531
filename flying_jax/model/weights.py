"""The resident weight layout: one copy per engine, read by every width's program.

Every projection is stored with the dimension tensor parallelism splits LEADING, so that the
shard any width's device needs is one contiguous run of rows, read with a dynamic slice along
axis 0 (no gather, no strided slice; on GPU, XLA can feed such a slice to the GEMM in place):

  wq [Rq*hd, D], wk / wv [Rkv*hd, D]    output heads leading (x @ W^T), kv-major head order,
                                         padded with zero heads to Rq / Rkv (`heads.weight_rows`)
  wo [Rq*hd, D]                           input heads leading (x @ W)
  w_gate / w_up [F, D]                    output columns leading (x @ W^T)
  w_down [F, D]                           input columns leading (x @ W)

Each device's rows are a plain GEMM operand: contracting over the minor dimension (x @ W^T) or
over the leading ones (x @ W). Width 1 reads the real rows as a static prefix. The decoder
layers' tensors are stacked on a leading layer axis (`[L, ...]`, never split) so that one
program walks every layer in a loop whose trip count is static (`model.decoder.layers`): one
dispatch per step and compile time about one layer's.

The arrays are the state of the family's flax nnx module (`model.decoder`), by module path; the
weight table (`model.tables`) says where each checkpoint tensor goes and which are split.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flying_jax.config import Architecture
from flying_jax.model.heads import HeadPlan
from flying_jax.parallel import Collectives


CONSTANTS = {"rope_inv": "attn.rope_inv", "window": "attn.window"}  # name -> module path


def layer_constants(arch: Architecture, layer: int) -> dict[str, np.ndarray]:
  """Per-layer constants as arrays, so one compiled layer program serves layers that differ in
  RoPE base or window (Gemma 3's sliding and global layers). Empty for models without windows."""
  if not arch.sliding_window:
    return {}
  hd = arch.head_dim
  inv = arch.layer_rope_theta(layer) ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
  window = arch.sliding_window if arch.sliding(layer) else 2**30
  return {"rope_inv": inv.astype(np.float32), "window": np.array([window], np.int32)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ResidentWeights:
  """The model's nnx state (`model.decoder`), as plain nested dicts of arrays by module path
  (cheap to flatten at every dispatch): the embeddings, the final norm, the output table (None
  when tied to the embeddings) and each decoder layer's state."""
  embed: dict                       # {"table": [V, D]}
  lm_head: dict | None              # {"table": [V, D]}; None when tied to `embed`
  final_norm: dict                  # {"scale": [D]}
  layers: dict                      # every layer's state stacked on a leading layer axis, e.g.
  # ^ {"attn": {"wq": [L, rows, D], ..}, "attn_norm": {"scale": [L, D]}, ..}

  @property
  def head_table(self) -> dict:
    """The state of the table logits read."""
    return self.embed if self.lm_head is None else self.lm_head

  def nbytes(self) -> int:
    """One copy (an engine's)."""
    return sum(x.nbytes for x in jax.tree.leaves(self))

  def device_nbytes(self) -> int:
    """What the first device holds: the replicated weights and its shard of the split ones."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(self))

  def buffer_pointers(self) -> list[int]:
    """Device buffer addresses of every shard: unchanged as long as no weight byte moves."""
    return [s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(self) for s in x.addressable_shards]


def _nest(flat: dict[str, object]) -> dict:
  """{"attn.wq": a, ...} -> {"attn": {"wq": a}, ...}."""
  out: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def at(tree: dict, path: str):
  """The leaf of nested dicts `tree` at a module path ("attn.wq")."""
  for key in path.split("."):
    tree = tree[key]
  return tree


def from_named(top: dict, layers, arch: Architecture) -> ResidentWeights:
  """Resident weights from arrays by canonical name (top-level and per layer; per-layer
  constants by their `CONSTANTS` name), put at their module paths (the table's `path`).
  `layers`: one dict per layer (stacked here: numpy on the host, `jnp.stack` on devices), or one
  dict of arrays already stacked on a leading layer axis."""
  from flying_jax.model.tables import spec_of

  path = lambda n: CONSTANTS.get(n) or spec_of(arch, n).path
  tree = lambda named: _nest({path(n): a for n, a in named.items() if a is not None})
  head = top.get("lm_head")
  if not isinstance(layers, dict):
    layers = {n: stack_layers([lw[n] for lw in layers]) for n in layers[0]}
  return ResidentWeights(embed=tree({"embed": top["embed"]})["embed"],
                         lm_head=None if head is None else tree({"lm_head": head})["lm_head"],
                         final_norm=tree({"final_norm": top["final_norm"]})["final_norm"],
                         layers=tree(layers))


def stack_layers(arrays: list):
  """Per-layer arrays -> one array with a leading layer axis (host or devices, kept there)."""
  if all(isinstance(a, np.ndarray) for a in arrays):
    return np.stack(arrays)
  if all(isinstance(a, jax.ShapeDtypeStruct) for a in arrays):
    return jax.ShapeDtypeStruct((len(arrays),) + arrays[0].shape, arrays[0].dtype)
  from jax.sharding import NamedSharding

  one = getattr(arrays[0], "sharding", None)
  out = lead(one) if isinstance(one, NamedSharding) else None
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=out)(*arrays)


def lead(sharding):
  """`sharding` (a NamedSharding or PartitionSpec of one layer's array) with a leading,
  unsplit layer axis in front."""
  from jax.sharding import NamedSharding, PartitionSpec

  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
  if isinstance(sharding, PartitionSpec):
    return PartitionSpec(None, *sharding)
  raise TypeError(f"cannot stack over {sharding!r}")


def layer(weights: ResidentWeights, l: int) -> dict:
  """Layer `l`'s state (a slice of each stacked array: a copy; for tests and tools)."""
  return jax.tree.map(lambda a: a[l], weights.layers)


def _blocks(rows) -> "RowBlocks":
  from flying_jax.model.heads import RowBlocks

  return rows if isinstance(rows, RowBlocks) else RowBlocks.single(rows)


def resident_tensor(name: str, array, arch: Architecture, dtype, rows=None):
  """One canonical tensor (one layer's slice of a per-layer one, see `flying_jax.checkpoints`)
  in its resident form and dtype, by its role in the family's table (`model.tables`):
  projections transposed to lead with the split dimension, head rows padded with zeros and cut
  into the engine's shards (`rows`: a `heads.RowBlocks`, or (query, KV) rows of a one-device
  engine; default: the real heads only), shard after shard along the leading axis. A numpy array
  stays on the host; a jax.Array (weights made on a device) is converted where it is."""
  from flying_jax.model.tables import spec_of

  xp = jnp if isinstance(array, jax.Array) else np
  a = xp.asarray(array, jnp.dtype(dtype))
  blocks = _blocks(rows or (arch.n_heads, arch.n_kv_heads))
  hd, dim = arch.head_dim, arch.dim
  role = spec_of(arch, name).role
  if role in ("q", "kv", "o"):                # [D, H, hd] or [Hq, hd, D] -> [Rows*hd, D]
    a = a.transpose(1, 2, 0).reshape(-1, dim) if role != "o" else a.reshape(-1, dim)
    lo, size = (blocks.kv_lo, blocks.kv_size) if role == "kv" else (blocks.q_lo, blocks.q_size)
    a = _pad_rows(a, (max(lo) + size) * hd, xp)
    if blocks.base > 1:
      a = xp.concatenate([a[l * hd:(l + size) * hd] for l in lo])
    return np.ascontiguousarray(a) if xp is np else a
  if role == "ffn_in":                                  # [D, F] -> [F, D]
    a = a.T
  elif role == "exp_in":                                # [E, D, F] -> [F, E, D]
    a = a.transpose(2, 0, 1)
  elif role == "exp_out":                               # [E, F, D] -> [F, E, D]
    a = a.transpose(1, 0, 2)
  return np.ascontiguousarray(a) if xp is np else a      # row-major: the layout programs expect


def resident_layout(canonical: dict[str, np.ndarray], arch: Architecture, dtype,
                    rows=None) -> dict:
  """Canonical checkpoint arrays (see `flying_jax.checkpoints`) -> host arrays in resident
  layout (`resident_tensor` of each)."""
  from flying_jax.model.tables import layer_specs

  conv = lambda name, a: resident_tensor(name, a, arch, dtype, rows)
  layers = [{**{s.name: conv(s.name, canonical[s.name][l]) for s in layer_specs(arch)},
             **layer_constants(arch, l)} for l in range(arch.n_layers)]
  return dict(embed=conv("embed", canonical["embed"]),
              lm_head=None if arch.tied_embeddings else conv("lm_head", canonical["lm_head"]),
              final_norm=conv("final_norm", canonical["final_norm"]), layers=layers)


def load_resident(tensors, arch: Architecture, dtype, rows, put, compiled=None) -> ResidentWeights:
  """Resident weights from a stream of canonical `Tensor`s (`checkpoints.iter_tensors`): each is
  converted and handed to `put(array, split)` (which places it on the devices, cut over an
  engine's devices when `split`) before the next is read, so the host holds about one tensor at
  a time. A layer's tensor is written in place into its name's stack (allocated on the devices
  when the name is first seen), so the devices never hold a tensor twice. `compiled(key, jitted,
  args, devices)`: the compiled `jitted` for `args` (structs), e.g. from the executable cache
  (`runtime.exec_cache`) so a warm start compiles none of these small programs; default: jit's own
  cache (one compile per shape in this process)."""
  from flying_jax.model.tables import is_split, layer_specs, spec_of

  blocks = _blocks(rows or (arch.n_heads, arch.n_kv_heads))
  top: dict = {}
  consts = [layer_constants(arch, l) for l in range(arch.n_layers)]
  layers: dict = {k: put(np.stack([c[k] for c in consts]), False) for k in consts[0]}
  seen = {s.name: np.zeros(arch.n_layers, bool) for s in layer_specs(arch)}
  makers = _StackMakers(compiled)
  for t in tensors:
    split = is_split(spec_of(arch, t.name), blocks)
    placed = put(resident_tensor(t.name, t.array, arch, dtype, rows), split)
    if t.layer is None:
      top[t.name] = placed
      continue
    if t.name not in layers:
      layers[t.name] = makers.empty(arch.n_layers, placed)
    layers[t.name] = makers.set_layer(layers[t.name], placed, np.int32(t.layer))
    seen[t.name][t.layer] = True
  missing = [n for n in ("embed", "final_norm") if n not in top]
  missing += [f"{n} of layer {l}" for n, got in seen.items() for l in np.flatnonzero(~got)]
  if not arch.tied_embeddings and "lm_head" not in top:
    missing.append("lm_head")
  if missing:
    raise ValueError(f"weights lack tensor(s) {missing[:6]}")
  return from_named(top, layers, arch)


class _StackMakers:
  """The two small programs that build the stacked layer tensors on the devices, one per tensor
  shape: zeros of a stack, and a stack with one layer replaced in place (donated)."""

  def __init__(self, compiled=None):
    self.compiled = compiled
    self._made: dict = {}

  def _get(self, key: tuple, jitted, args, devices):
    if key not in self._made:
      structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))
                 for a in args]
      self._made[key] = (jitted if self.compiled is None else
                         self.compiled(key, jitted, structs, devices))
    return self._made[key]

  def empty(self, n: int, like: jax.Array) -> jax.Array:
    shape, dtype, sharding = (n,) + like.shape, jnp.dtype(like.dtype), lead(like.sharding)
    jitted = jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)
    return self._get(("stack_zeros", shape, str(dtype), _sharding_key(sharding)), jitted, (),
                     sharding)()

  def set_layer(self, stack: jax.Array, one: jax.Array, l) -> jax.Array:
    key = ("stack_set_layer", stack.shape, str(stack.dtype), _sharding_key(stack.sharding),
           one.shape, str(one.dtype), _sharding_key(one.sharding))
    return self._get(key, _set_layer, (stack, one, l), stack.sharding)(stack, one, l)


def _sharding_key(sharding) -> tuple:
  """A stable description of a named sharding (the devices are in the cache's file name)."""
  return (tuple(sharding.mesh.shape.items()), tuple(sharding.spec))


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, one: jax.Array, l) -> jax.Array:
  """`stack` with layer `l` replaced by `one`, in place (the stack is donated; one compile per
  tensor shape, not per call)."""
  return jax.lax.dynamic_update_index_in_dim(stack, one.astype(stack.dtype), l, 0)


def _pad_rows(a, rows: int, xp=np):
  if a.shape[0] > rows:
    raise ValueError(f"{a.shape[0]} rows do not fit a layout of {rows}")
  if a.shape[0] == rows:
    return a
  return xp.concatenate([a, xp.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)])


def _path(keypath) -> str:
  """The module path of a leaf of `ResidentWeights` or of one layer's state ("attn.wq",
  "embed.table")."""
  keys = [getattr(k, "name", getattr(k, "key", getattr(k, "idx", None))) for k in keypath]
  if keys and keys[0] == "layers":
    keys = keys[1:]
  return ".".join(str(k) for k in keys)


def weight_shardings(tree, arch: Architecture, split, whole, vocab: bool = False,
                     stacked: bool = False):
  """`tree` (`ResidentWeights`, or one layer's state) with `split` (an engine's devices each
  hold a shard of the leading axis) or `whole` (shardings or specs) in place of each array, by
  the logical axes the weight table gives its path (`vocab`: the vocabulary is split too);
  per-layer constants are whole. The stacked layers of a `ResidentWeights` (or `tree` itself,
  when `stacked`: the `layers` dict) get a leading, unsplit layer axis in front."""
  from flying_jax.model.tables import SPLIT_AXES, by_path

  axes = SPLIT_AXES + (("vocab",) if vocab else ())
  specs = by_path(arch)

  def pick(keypath, _):
    spec = specs.get(_path(keypath))
    chosen = split if spec is not None and spec.axes[0] in axes else whole
    in_layers = stacked or (keypath and getattr(keypath[0], "name", None) == "layers")
    return lead(chosen) if in_layers else chosen
  return jax.tree_util.tree_map_with_path(pick, tree)


def place(host: dict, arch: Architecture, specs, vocab: bool = False) -> ResidentWeights:
  """Put host arrays in resident layout (`resident_layout`) on the devices once: each engine
  holds one copy, its projections (and its embeddings when `vocab`) cut over its devices
  (`specs`: the `MeshSpecs` of any width)."""
  tree = from_named(host, host["layers"], arch)
  return jax.tree.map(jax.device_put, tree,
                      weight_shardings(tree, arch, specs.sharded(), specs.replicated(), vocab))


def abstract(arch: Architecture, dtype, specs, rows=None) -> ResidentWeights:
  """ShapeDtypeStructs of the resident weights on `specs`' mesh, from the family's nnx module
  made abstractly (`decoder.abstract_model`): AOT lowering and orbax restore targets. `rows`: as
  in `resident_tensor`."""
  from flying_jax.model.decoder import abstract_model, resident_state

  blocks = _blocks(rows or (arch.n_heads, arch.n_kv_heads))
  state = resident_state(abstract_model(arch, dtype, blocks))
  shardings = weight_shardings(state, arch, specs.sharded(), specs.replicated(), blocks.vocab)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                      shardings)


def rows_of(weights: ResidentWeights, head_dim: int, base: int = 1) -> tuple[int, int]:
  """(query heads, KV heads) rows one device's shard of the resident weights (or their abstract
  structs) holds."""
  attn = weights.layers["attn"]
  return attn["wq"].shape[1] // head_dim // base, attn["wk"].shape[1] // head_dim // base


def _rows(w, start, size: int, index, whole: bool):
  """Rows `start[index] : + size` of this device's shard `w`; `whole`: all of them (its real
  rows come first; the caller drops the zero rows from the activations, which costs less than
  copying the weight, as a prefix slice would on some backends)."""
  if whole:
    return w
  return jax.lax.dynamic_slice_in_dim(w, jnp.asarray(start, jnp.int32)[index], size, axis=0)


def shard_rows(w, kind: str, plan: HeadPlan, coll: Collectives, head_dim: int):
  """This device's run of rows of its shard `w` of a resident projection (`kind`: "q" rows of
  wq / wo, "kv" of wk / wv, "ffn" of the MLP's or the experts' columns): one contiguous slice
  along axis 0, taken inside the program (nothing persistent, no gather); at an engine's own
  width, its whole shard (rows past `plan.q_per_device` / `kv_per_device` are zeros)."""
  r = plan.reads
  d = coll.index() if plan.width > 1 else 0
  if kind == "q":
    return _rows(w, np.asarray(r.q) * head_dim, plan.q_per_device * head_dim, d, r.whole)
  if kind == "kv":
    return _rows(w, np.asarray(r.kv) * head_dim, plan.kv_per_device * head_dim, d, r.whole)
  return _rows(w, r.ffn, r.ffn_size, d, r.whole)

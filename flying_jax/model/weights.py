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
over the leading ones (x @ W). Width 1 reads the real rows as a static prefix. Layers are
separate arrays so no program slices a layer out of a stack.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flying_jax.config import Architecture
from flying_jax.model.heads import HeadPlan
from flying_jax.parallel import Collectives


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerWeights:
  attn_norm: jax.Array   # [D]
  wq: jax.Array          # [Rq*hd, D]
  wk: jax.Array          # [Rkv*hd, D]
  wv: jax.Array          # [Rkv*hd, D]
  wo: jax.Array          # [Rq*hd, D]
  ffn_norm: jax.Array    # [D]
  w_gate: jax.Array      # [F, D]
  w_up: jax.Array        # [F, D]
  w_down: jax.Array      # [F, D]
  # the family's other tensors (`model.tables`), None where it has none:
  q_norm: jax.Array | None = None           # [hd] per-head RMSNorm of q (Qwen3, Gemma 3)
  k_norm: jax.Array | None = None           # [hd]
  post_attn_norm: jax.Array | None = None   # [D] Gemma 3's norm of the attention output
  post_ffn_norm: jax.Array | None = None    # [D] and of the FFN output
  w_router: jax.Array | None = None         # [D, E] a mixture of experts' gate (Mixtral), whose
  # ^ w_gate / w_up / w_down are then [F, E, D]: every expert's FFN columns, column-major
  # per-layer constants of models whose layers differ (`layer_constants`), not from checkpoints:
  rope_inv: jax.Array | None = None         # [hd/2] float32 RoPE inverse frequencies
  window: jax.Array | None = None           # [1] int32 keys visible to a query (sliding window)


CONSTANTS = ("rope_inv", "window")


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
  embed: jax.Array                  # [V, D]
  unembed: jax.Array | None         # [V, D]; None when tied to `embed`
  final_norm: jax.Array             # [D]
  layers: tuple[LayerWeights, ...]

  @property
  def logits_weight(self) -> jax.Array:
    return self.embed if self.unembed is None else self.unembed

  def nbytes(self) -> int:
    """One copy (an engine's)."""
    return sum(x.nbytes for x in jax.tree.leaves(self))

  def device_nbytes(self) -> int:
    """What the first device holds: the replicated weights and its shard of the split ones."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(self))

  def buffer_pointers(self) -> list[int]:
    """Device buffer addresses of every shard: unchanged as long as no weight byte moves."""
    return [s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(self) for s in x.addressable_shards]


SPLIT = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")   # the fields `tables.is_split`


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
              unembed=None if arch.tied_embeddings else conv("lm_head", canonical["lm_head"]),
              final_norm=conv("final_norm", canonical["final_norm"]), layers=layers)


def load_resident(tensors, arch: Architecture, dtype, rows, put) -> ResidentWeights:
  """Resident weights from a stream of canonical `Tensor`s (`checkpoints.iter_tensors`): each is
  converted and handed to `put(array, split)` (which places it on the devices, cut over an
  engine's devices when `split`) before the next is read, so the host holds about one tensor at
  a time."""
  from flying_jax.model.tables import is_split, layer_specs, spec_of

  blocks = _blocks(rows or (arch.n_heads, arch.n_kv_heads))
  top: dict = {}
  layers: list[dict] = [{k: put(v, False) for k, v in layer_constants(arch, l).items()}
                        for l in range(arch.n_layers)]
  for t in tensors:
    split = is_split(spec_of(arch, t.name), blocks)
    placed = put(resident_tensor(t.name, t.array, arch, dtype, rows), split)
    (top if t.layer is None else layers[t.layer])[t.name] = placed
  missing = [n for n in ("embed", "final_norm") if n not in top]
  missing += [f"{s.name} of layer {l}" for l, lw in enumerate(layers) for s in layer_specs(arch)
              if s.name not in lw]
  if not arch.tied_embeddings and "lm_head" not in top:
    missing.append("lm_head")
  if missing:
    raise ValueError(f"weights lack tensor(s) {missing[:6]}")
  return ResidentWeights(embed=top["embed"], unembed=top.get("lm_head"),
                         final_norm=top["final_norm"],
                         layers=tuple(LayerWeights(**lw) for lw in layers))


def _pad_rows(a, rows: int, xp=np):
  if a.shape[0] > rows:
    raise ValueError(f"{a.shape[0]} rows do not fit a layout of {rows}")
  if a.shape[0] == rows:
    return a
  return xp.concatenate([a, xp.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)])


def layer_specs_tree(lw: LayerWeights, split, whole) -> LayerWeights:
  """A LayerWeights of `split` for the projections and `whole` for the rest (None stays None):
  shardings or PartitionSpecs, by field."""
  return LayerWeights(**{f.name: None if getattr(lw, f.name) is None else
                         (split if f.name in SPLIT else whole) for f in dataclasses.fields(lw)})


def weight_shardings(weights: ResidentWeights, split, whole, vocab: bool = False
                     ) -> ResidentWeights:
  """`weights`' tree with `split` / `whole` (shardings or specs) in place of each array
  (`vocab`: the embeddings are split too)."""
  emb = split if vocab else whole
  return ResidentWeights(embed=emb, unembed=None if weights.unembed is None else emb,
                         final_norm=whole,
                         layers=tuple(layer_specs_tree(lw, split, whole) for lw in weights.layers))


def place(host: dict, specs, vocab: bool = False) -> ResidentWeights:
  """Put the weights on the devices once: each engine holds one copy, its projections (and its
  embeddings when `vocab`) cut over its devices (`specs`: the `MeshSpecs` of any width)."""
  def put(a, split):
    return None if a is None else jax.device_put(a, specs.sharded() if split else
                                                 specs.replicated())
  layers = tuple(LayerWeights(**{k: put(v, k in SPLIT) for k, v in lw.items() if v is not None})
                 for lw in host["layers"])
  return ResidentWeights(embed=put(host["embed"], vocab), unembed=put(host["unembed"], vocab),
                         final_norm=put(host["final_norm"], False), layers=layers)


def abstract(arch: Architecture, dtype, specs, rows=None) -> ResidentWeights:
  """ShapeDtypeStructs of the resident weights on `specs`' mesh: AOT lowering and orbax restore
  targets. `rows`: as in `resident_tensor`."""
  from flying_jax.model.tables import is_split, resident_shape, table

  a, b = arch, _blocks(rows or (arch.n_heads, arch.n_kv_heads))
  struct = lambda spec: jax.ShapeDtypeStruct(
      resident_shape(spec, a, b), dtype,
      sharding=specs.sharded() if is_split(spec, b) else specs.replicated())
  fields = {sp.name: struct(sp) for sp in table(a)}
  const = lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=specs.replicated())
  per_layer = {sp.name: fields[sp.name] for sp in table(a) if sp.per_layer}
  layers = tuple(LayerWeights(**per_layer, **{k: const(c) for k, c in layer_constants(a, l).items()})
                 for l in range(a.n_layers))
  return ResidentWeights(embed=fields["embed"], unembed=fields.get("lm_head"),
                         final_norm=fields["final_norm"], layers=layers)


def rows_of(weights: ResidentWeights, head_dim: int, base: int = 1) -> tuple[int, int]:
  """(query heads, KV heads) rows one device's shard of the resident weights (or their abstract
  structs) holds."""
  lw = weights.layers[0]
  return lw.wq.shape[0] // head_dim // base, lw.wk.shape[0] // head_dim // base


def _rows(w, start, size: int, index, whole: bool):
  """Rows `start[index] : + size` of this device's shard `w`; `whole`: all of them (its real
  rows come first; the caller drops the zero rows from the activations, which costs less than
  copying the weight, as a prefix slice would on some backends)."""
  if whole:
    return w
  return jax.lax.dynamic_slice_in_dim(w, jnp.asarray(start, jnp.int32)[index], size, axis=0)


def shard_layer(lw: LayerWeights, plan: HeadPlan, coll: Collectives, arch: Architecture):
  """This device's runs of rows of its shard of a resident layer: contiguous slices along axis
  0, taken inside the program (nothing persistent, no gather). Returns (wq, wk, wv, wo, w_gate,
  w_up, w_down); at an engine's own width, its whole shard (rows past `plan.q_per_device` /
  `kv_per_device` are zeros)."""
  r = plan.reads
  d = coll.index() if plan.width > 1 else 0
  nq, nkv, hd = plan.q_per_device, plan.kv_per_device, arch.head_dim
  q = lambda w: _rows(w, np.asarray(r.q) * hd, nq * hd, d, r.whole)
  kv = lambda w: _rows(w, np.asarray(r.kv) * hd, nkv * hd, d, r.whole)
  ffn = lambda w: _rows(w, r.ffn, r.ffn_size, d, r.whole)
  return (q(lw.wq), kv(lw.wk), kv(lw.wv), q(lw.wo), ffn(lw.w_gate), ffn(lw.w_up),
          ffn(lw.w_down))

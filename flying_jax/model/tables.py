"""Weight tables: each family declares its tensors once, and every reader and the layout use it.

A `TensorSpec` names one canonical tensor, the path of its parameter in the family's flax nnx
module (`model.layers`; relative to a decoder layer for per-layer tensors), its role (which fixes
its shapes, its logical axes, how it is transposed, and how tensor parallelism splits it), and the
names GGUF files and Hugging Face safetensors give it (`{i}` stands for the layer). The modules
create their parameters from it, and the GGUF and safetensors readers, random initialisation, the
resident layout, the loader and the orbax store all walk `table(arch)`; no other module spells a
checkpoint name.

Roles, with the canonical (`x @ W`) shape and the stored `[out, in]` shape both formats use:

  embed      [V, D]                       [V, D]
  norm       [D]                          [D]           (RMSNorm weight, replicated)
  head_norm  [hd]                         [hd]          (per-head RMSNorm shared by the heads)
  q          [D, Hq, hd]                  [Hq*hd, D]    (split by query heads)
  kv         [D, Hkv, hd]                 [Hkv*hd, D]   (split by KV heads)
  o          [Hq, hd, D]                  [D, Hq*hd]    (split by query heads, input side)
  ffn_in     [D, F]                       [F, D]        (split by FFN columns)
  ffn_out    [F, D]                       [D, F]        (split by FFN columns, input side)
  router     [D, E]                       [E, D]        (a mixture of experts' gate, replicated)
  exp_in     [E, D, F]                    [F, D] each   (every expert split by FFN columns)
  exp_out    [E, F, D]                    [D, F] each

Logical axes of the resident layout (`AXES`): the split dimension leads. An engine of several
devices cuts `SPLIT_AXES` (and `vocab` when every width divides the vocabulary) over its devices;
the partition code maps that to its mesh axis.

Expert tensors are stored one per expert (`{k}` in the name: Hugging Face Mixtral) or stacked on
a leading expert axis (GGUF's `ffn_gate_exps`).
"""

from __future__ import annotations

import dataclasses
import functools

from flying_jax.config import Architecture

ROLES = ("embed", "norm", "head_norm", "q", "kv", "o", "ffn_in", "ffn_out", "router", "exp_in",
         "exp_out")
EXPERTS = ("exp_in", "exp_out")
AXES = {"embed": ("vocab", "embed"), "norm": ("embed",), "head_norm": ("head_dim",),
        "q": ("q_rows", "embed"), "kv": ("kv_rows", "embed"), "o": ("q_rows", "embed"),
        "ffn_in": ("ffn", "embed"), "ffn_out": ("ffn", "embed"), "router": ("embed", "experts"),
        "exp_in": ("ffn", "experts", "embed"), "exp_out": ("ffn", "experts", "embed")}
SPLIT_AXES = ("q_rows", "kv_rows", "ffn")   # cut over an engine's devices (and `vocab` may be)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  name: str                 # canonical name
  role: str                 # one of ROLES
  path: str                 # the parameter in the nnx module ("attn.wq": `layer.attn.wq`)
  gguf: str                 # GGUF tensor name; "{i}" is the layer
  hf: str                   # Hugging Face safetensors name; "{i}" is the layer
  per_layer: bool = True
  hf_offset: float = 0.0    # HF stores weight - offset (Gemma's RMSNorm computes x * (1 + w))

  @property
  def axes(self) -> tuple[str, ...]:
    """Logical axes of the resident array."""
    return AXES[self.role]

  def canonical_shape(self, arch: Architecture) -> tuple[int, ...]:
    a = arch
    one = {"embed": (a.vocab_size, a.dim), "norm": (a.dim,), "head_norm": (a.head_dim,),
           "q": (a.dim, a.n_heads, a.head_dim), "kv": (a.dim, a.n_kv_heads, a.head_dim),
           "o": (a.n_heads, a.head_dim, a.dim), "ffn_in": (a.dim, a.ffn_dim),
           "ffn_out": (a.ffn_dim, a.dim), "router": (a.dim, a.n_experts),
           "exp_in": (a.dim, a.ffn_dim), "exp_out": (a.ffn_dim, a.dim)}[self.role]
    return (a.n_experts,) + one if self.role in EXPERTS else one

  def stored_shape(self, arch: Architecture) -> tuple[int, ...]:
    """The `[out, in]` shape GGUF (as numpy) and safetensors store (of one expert)."""
    c = self.canonical_shape(arch)[1:] if self.role in EXPERTS else self.canonical_shape(arch)
    if self.role in ("q", "kv"):
      return (c[1] * c[2], c[0])
    if self.role == "o":
      return (c[2], c[0] * c[1])
    if self.role in ("ffn_in", "ffn_out", "router", "exp_in", "exp_out"):
      return (c[1], c[0])
    return c

  @property
  def per_expert(self) -> bool:
    """Stored one tensor per expert (`{k}` in the Hugging Face name)."""
    return "{k}" in self.hf

  def to_canonical(self, stored, arch: Architecture):
    """A stored `[out, in]` array (numpy; experts stacked on a leading axis) in canonical
    orientation."""
    c = self.canonical_shape(arch)
    if self.role in EXPERTS:
      return stored.transpose(0, 2, 1)
    if self.role in ("q", "kv", "ffn_in", "ffn_out", "o", "router"):
      return stored.T.reshape(c)
    return stored

  def to_stored(self, canonical, arch: Architecture):
    """The inverse of `to_canonical` (writing checkpoints)."""
    if self.role in EXPERTS:
      raise ValueError("writing expert tensors is not supported")
    s = self.stored_shape(arch)
    if self.role in ("q", "kv", "o"):
      return canonical.reshape(-1, s[0]).T
    if self.role in ("ffn_in", "ffn_out", "router"):
      return canonical.T
    return canonical

def _llama(q_k_norms: bool = False) -> tuple[TensorSpec, ...]:
  L, T = "model.layers.{i}.", TensorSpec
  specs = [
      T("embed", "embed", "embed.table", "token_embd.weight", "model.embed_tokens.weight", False),
      T("final_norm", "norm", "final_norm.scale", "output_norm.weight", "model.norm.weight",
        False),
      T("lm_head", "embed", "lm_head.table", "output.weight", "lm_head.weight", False),
      T("attn_norm", "norm", "attn_norm.scale", "blk.{i}.attn_norm.weight",
        L + "input_layernorm.weight"),
      T("wq", "q", "attn.wq", "blk.{i}.attn_q.weight", L + "self_attn.q_proj.weight"),
      T("wk", "kv", "attn.wk", "blk.{i}.attn_k.weight", L + "self_attn.k_proj.weight"),
      T("wv", "kv", "attn.wv", "blk.{i}.attn_v.weight", L + "self_attn.v_proj.weight"),
      T("wo", "o", "attn.wo", "blk.{i}.attn_output.weight", L + "self_attn.o_proj.weight"),
      T("ffn_norm", "norm", "ffn_norm.scale", "blk.{i}.ffn_norm.weight",
        L + "post_attention_layernorm.weight"),
      T("w_gate", "ffn_in", "mlp.w_gate", "blk.{i}.ffn_gate.weight", L + "mlp.gate_proj.weight"),
      T("w_up", "ffn_in", "mlp.w_up", "blk.{i}.ffn_up.weight", L + "mlp.up_proj.weight"),
      T("w_down", "ffn_out", "mlp.w_down", "blk.{i}.ffn_down.weight", L + "mlp.down_proj.weight"),
  ]
  if q_k_norms:
    specs += [T("q_norm", "head_norm", "attn.q_norm.scale", "blk.{i}.attn_q_norm.weight",
                L + "self_attn.q_norm.weight"),
              T("k_norm", "head_norm", "attn.k_norm.scale", "blk.{i}.attn_k_norm.weight",
                L + "self_attn.k_norm.weight")]
  return tuple(specs)


def gemma3() -> tuple[TensorSpec, ...]:
  """Gemma 3: q/k norms, a norm after attention and one around the FFN (HF: stored minus one)."""
  L = "model.layers.{i}."
  rename = {"ffn_norm": L + "pre_feedforward_layernorm.weight"}
  specs = [dataclasses.replace(s, hf=rename.get(s.name, s.hf),
                               hf_offset=1.0 if s.role in ("norm", "head_norm") else 0.0)
           for s in _llama(q_k_norms=True)]
  specs += [TensorSpec("post_attn_norm", "norm", "post_attn_norm.scale",
                       "blk.{i}.post_attention_norm.weight", L + "post_attention_layernorm.weight",
                       hf_offset=1.0),
            TensorSpec("post_ffn_norm", "norm", "post_ffn_norm.scale",
                       "blk.{i}.post_ffw_norm.weight", L + "post_feedforward_layernorm.weight",
                       hf_offset=1.0)]
  return tuple(specs)


def mixtral() -> tuple[TensorSpec, ...]:
  """Mixtral: Llama's attention, a top-k mixture of SwiGLU experts in place of the FFN."""
  L = "model.layers.{i}.block_sparse_moe."
  moe = {"w_gate": ("exp_in", "blk.{i}.ffn_gate_exps.weight", L + "experts.{k}.w1.weight"),
         "w_up": ("exp_in", "blk.{i}.ffn_up_exps.weight", L + "experts.{k}.w3.weight"),
         "w_down": ("exp_out", "blk.{i}.ffn_down_exps.weight", L + "experts.{k}.w2.weight")}
  specs = [dataclasses.replace(s, role=moe[s.name][0], gguf=moe[s.name][1], hf=moe[s.name][2])
           if s.name in moe else s for s in _llama()]
  return tuple(specs) + (TensorSpec("w_router", "router", "mlp.router",
                                    "blk.{i}.ffn_gate_inp.weight", L + "gate.weight"),)


def llama() -> tuple[TensorSpec, ...]:
  return _llama()


def qwen3() -> tuple[TensorSpec, ...]:
  return _llama(q_k_norms=True)




@functools.cache
def table(arch: Architecture) -> tuple[TensorSpec, ...]:
  """The tensors of `arch`'s family (`families.Family.table`), `lm_head` left out when embeddings
  are tied: top-level tensors first, then the per-layer ones in the order readers yield them."""
  from flying_jax.model.families import family_of

  specs = family_of(arch.family).table()
  return tuple(s for s in specs if not (s.name == "lm_head" and arch.tied_embeddings))


def layer_specs(arch: Architecture) -> tuple[TensorSpec, ...]:
  return tuple(s for s in table(arch) if s.per_layer)


def top_specs(arch: Architecture) -> tuple[TensorSpec, ...]:
  return tuple(s for s in table(arch) if not s.per_layer)


@functools.cache
def _by_name(arch: Architecture) -> dict[str, TensorSpec]:
  return {s.name: s for s in table(arch)}


def spec_of(arch: Architecture, name: str) -> TensorSpec:
  try:
    return _by_name(arch)[name]
  except KeyError:
    raise KeyError(f"{arch.family} has no tensor {name!r}") from None


def split_axes(blocks) -> tuple[str, ...]:
  """The logical axes an engine cuts over its devices in the layout `blocks`
  (`heads.RowBlocks`): the projections', and the vocabulary when every width divides it."""
  return SPLIT_AXES + (("vocab",) if blocks.vocab else ())


def is_split(spec: TensorSpec, blocks) -> bool:
  """Whether an engine's devices each hold a 1/base shard of `spec`'s leading axis, else every
  device holds it whole."""
  return spec.axes[0] in split_axes(blocks)


@functools.cache
def by_path(arch: Architecture) -> dict[str, TensorSpec]:
  """The table by module path."""
  return {s.path: s for s in table(arch)}


def resident_shape(spec: TensorSpec, arch: Architecture, blocks) -> tuple[int, ...]:
  """The shape of one engine's copy of `spec` (one layer's) in the resident layout: projections
  lead with the split dimension, head rows padded to `blocks` (`heads.RowBlocks`), shard after
  shard."""
  a, t = arch, blocks.base
  return {"q": (t * blocks.q_size * a.head_dim, a.dim), "o": (t * blocks.q_size * a.head_dim, a.dim),
          "kv": (t * blocks.kv_size * a.head_dim, a.dim), "ffn_in": (a.ffn_dim, a.dim),
          "ffn_out": (a.ffn_dim, a.dim), "exp_in": (a.ffn_dim, a.n_experts, a.dim),
          "exp_out": (a.ffn_dim, a.n_experts, a.dim)}.get(spec.role, spec.canonical_shape(a))


def resident_bytes(arch: Architecture, blocks, itemsize: int) -> tuple[int, int]:
  """(bytes of one engine's copy, bytes one device holds) of the resident weights laid out in
  `blocks` (`heads.RowBlocks`) at `itemsize` bytes per element, exactly as the engine allocates
  them (`resident_shape`, `is_split`); norms and per-layer constants (float32 RoPE frequencies,
  an int32 window) on every device."""
  split = whole = 0
  for s in table(arch):
    n = itemsize * (arch.n_layers if s.per_layer else 1)
    for d in resident_shape(s, arch, blocks):
      n *= d
    if is_split(s, blocks):
      split += n
    else:
      whole += n
  if arch.sliding_window:                    # weights.layer_constants
    whole += arch.n_layers * (arch.head_dim // 2 * 4 + 4)
  return whole + split, whole + split // blocks.base

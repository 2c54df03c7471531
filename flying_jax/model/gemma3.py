"""The Gemma 3 decoder layer (the text decoder of Gemma 3) as a flax nnx module.

Differences from Llama (`llama.py`; both built from `model.layers`):
- embeddings are multiplied by sqrt(dim) (in float32, then cast): `EMBED_SCALE`;
- per-head RMSNorms on q and k before RoPE;
- "sandwich" norms: the attention output and the FFN output are RMS-normed (after the sum over
  the group: a norm of a partial sum would be wrong) before they join the residual;
- GeGLU with the tanh approximation of GELU;
- five of every six layers attend to a sliding window with their own RoPE base, read from the
  attention's per-layer constants (`weights.layer_constants`) so one compiled program serves both
  kinds;
- scores scale by `query_pre_attn_scalar ** -0.5`.
GGUF norm weights include Gemma's `1 +`; Hugging Face ones are read plus one (`model.tables`).
"""

from __future__ import annotations

import jax
from flax import nnx

from flying_jax.model.batch import StepMeta
from flying_jax.model.layers import Attention, GatedMLP, Init, RMSNorm, Step

EMBED_SCALE = True           # token embeddings times sqrt(dim)


class Layer(nnx.Module):
  def __init__(self, init: Init):
    self.attn_norm = RMSNorm(init, "attn_norm")
    self.attn = Attention(init)
    self.post_attn_norm = RMSNorm(init, "post_attn_norm")
    self.ffn_norm = RMSNorm(init, "ffn_norm")
    self.mlp = GatedMLP(init, "gelu_tanh")
    self.post_ffn_norm = RMSNorm(init, "post_ffn_norm")

  def __call__(self, k_pool, v_pool, layer, x_TxD, meta: StepMeta, step: Step):
    """One Gemma 3 decoder layer on this device; writes the step's KV into entry `layer` of the
    stacked pools of its page space."""
    coll = step.coll
    with jax.named_scope("attention"):
      o, k_pool, v_pool = self.attn(self.attn_norm(x_TxD), k_pool, v_pool, layer, meta, step)
      x_TxD = x_TxD + self.post_attn_norm(coll.sum(o))
    with jax.named_scope("ffn"):
      x_TxD = x_TxD + self.post_ffn_norm(coll.sum(self.mlp(self.ffn_norm(x_TxD), step)))
    return x_TxD, k_pool, v_pool

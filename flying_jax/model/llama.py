"""The Llama decoder layer as a flax nnx module, from the shared layers (`model.layers`).

Also Mistral (a sliding window through the attention's per-layer constants), Qwen3 (per-head q/k
norms, present when the family's weight table has them) and Mixtral (a mixture of experts in
place of the dense MLP, `moe.py`).

A layer runs on one device (under `per_device`); the width is static in its `Step` and only
decides which heads/columns the device reads and whether partial sums are reduced over the group.
"""

from __future__ import annotations

import jax
from flax import nnx

from flying_jax.model.batch import StepMeta
from flying_jax.model.layers import Attention, GatedMLP, Init, RMSNorm, Step
from flying_jax.model.moe import MoE

EMBED_SCALE = False          # token embeddings are used as they are


class Layer(nnx.Module):
  def __init__(self, init: Init):
    self.attn_norm = RMSNorm(init, "attn_norm")
    self.attn = Attention(init)
    self.ffn_norm = RMSNorm(init, "ffn_norm")
    self.mlp = MoE(init) if init.arch.n_experts else GatedMLP(init, "silu")

  def __call__(self, k_pool, v_pool, layer, x_TxD, meta: StepMeta, step: Step):
    """One decoder layer on this device; writes the step's KV into entry `layer` of the stacked
    pools of its page space, returns them."""
    coll = step.coll
    with jax.named_scope("attention"):
      o, k_pool, v_pool = self.attn(self.attn_norm(x_TxD), k_pool, v_pool, layer, meta, step)
      x_TxD = x_TxD + coll.sum(o)
    with jax.named_scope("ffn"):
      x_TxD = x_TxD + coll.sum(self.mlp(self.ffn_norm(x_TxD), step))
    return x_TxD, k_pool, v_pool

"""A top-k mixture of SwiGLU experts (Mixtral), split over a group like the dense FFN.

Every device holds the same FFN columns of every expert (`w_gate` etc. are
[F, E, D], columns leading, so a width's share is one contiguous run of rows), computes the
router on the whole activations (the router is replicated: each device picks the same experts),
and the group sums the partial outputs as it does for a dense FFN. Each token's output is the
softmax-weighted sum of its top-k experts (softmax over the k chosen logits, as Hugging Face's
Mixtral renormalises). The experts are evaluated densely with zero weight for the ones a token
did not pick: exact, at E/k times the FLOPs of a routed kernel (expert parallelism and grouped
matmuls are not here yet).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flying_jax.model.layers import Init, Step
from flying_jax.model.weights import shard_rows


class MoE(nnx.Module):
  """A replicated router [D, E] and every expert's SwiGLU, [F, E, D] each."""

  def __init__(self, init: Init):
    self.router = init.param("w_router")
    self.w_gate, self.w_up, self.w_down = (init.param(n) for n in ("w_gate", "w_up", "w_down"))

  def __call__(self, h_TxD, step: Step):
    """This device's partial output of the expert mixture (before the sum over the group)."""
    router_DxE = self.router[...]
    n_experts, top_k = router_DxE.shape[1], step.arch.experts_per_token
    rows = lambda w: shard_rows(w[...], "ffn", step.plan, step.coll, step.arch.head_dim)
    with jax.named_scope("router"):
      logits_TxE = jnp.dot(h_TxD.astype(jnp.float32), router_DxE.astype(jnp.float32))
      top_v, top_i = jax.lax.top_k(logits_TxE, top_k)
      weights_TxK = jax.nn.softmax(top_v, axis=-1)
      combine_TxE = (jax.nn.one_hot(top_i, n_experts, dtype=jnp.float32)
                     * weights_TxK[..., None]).sum(1)
    g = jnp.einsum("td,fed->tef", h_TxD, rows(self.w_gate), preferred_element_type=jnp.float32)
    u = jnp.einsum("td,fed->tef", h_TxD, rows(self.w_up), preferred_element_type=jnp.float32)
    a = (jax.nn.silu(g) * u * combine_TxE[:, :, None]).astype(h_TxD.dtype)
    return jnp.einsum("tef,fed->td", a, rows(self.w_down))

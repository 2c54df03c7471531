"""A top-k mixture of SwiGLU experts (Mixtral), split over a group like the dense FFN.

Every device holds the same FFN columns of every expert (`LayerWeights.w_gate` etc. are
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

from flying_jax.parallel import Collectives


def moe_ffn(h_TxD, w_router_DxE, w_gate_FxExD, w_up_FxExD, w_down_FxExD, *, top_k: int,
            coll: Collectives):
  """This device's partial output of the expert mixture (before the sum over the group)."""
  n_experts = w_router_DxE.shape[1]
  with jax.named_scope("router"):
    logits_TxE = jnp.dot(h_TxD.astype(jnp.float32), w_router_DxE.astype(jnp.float32))
    top_v, top_i = jax.lax.top_k(logits_TxE, top_k)
    weights_TxK = jax.nn.softmax(top_v, axis=-1)
    combine_TxE = (jax.nn.one_hot(top_i, n_experts, dtype=jnp.float32)
                   * weights_TxK[..., None]).sum(1)
  g = jnp.einsum("td,fed->tef", h_TxD, w_gate_FxExD, preferred_element_type=jnp.float32)
  u = jnp.einsum("td,fed->tef", h_TxD, w_up_FxExD, preferred_element_type=jnp.float32)
  a = (jax.nn.silu(g) * u * combine_TxE[:, :, None]).astype(h_TxD.dtype)
  return coll.sum(jnp.einsum("tef,fed->td", a, w_down_FxExD))

"""Pallas kernels over flying-jax's paged KV pool."""

from flying_jax.model.kernels.paged_gpu import paged_attention_pallas
from flying_jax.model.kernels.paged_tpu import paged_attention_tpu

__all__ = ["paged_attention_pallas", "paged_attention_tpu"]

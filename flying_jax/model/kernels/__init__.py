"""Pallas kernels over flying-jax's paged KV pool."""

from flying_jax.model.kernels.paged_gpu import paged_attention_pallas

__all__ = ["paged_attention_pallas"]

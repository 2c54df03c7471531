"""Sampling: request parameters, the host-side batch packer and the on-device sampler."""

from flying_jax.sampling.device import (
    PARTIAL_TOP_K,
    TOPN,
    SampleOut,
    SamplingBatch,
    apply_penalties,
    apply_top_k_top_p,
    process_logits,
    sample,
)
from flying_jax.sampling.pack import RowSpec, pack_sampling
from flying_jax.sampling.params import MAX_LOGPROBS, SAMPLING_EPS, SamplingParams

__all__ = [
    "MAX_LOGPROBS", "PARTIAL_TOP_K", "SAMPLING_EPS", "TOPN", "RowSpec", "SampleOut", "SamplingBatch",
    "SamplingParams", "apply_penalties", "apply_top_k_top_p", "pack_sampling", "process_logits", "sample",
]

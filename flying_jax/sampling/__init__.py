"""Sampling: request parameters, the host-side batch packer and the on-device sampler."""

from flying_jax.sampling.device import (
    PARTIAL_TOP_K,
    TOPN,
    SampleOut,
    SamplingBatch,
    apply_penalties,
    apply_token_mask,
    apply_top_k_top_p,
    mask_words,
    process_logits,
    sample,
)
from flying_jax.sampling.pack import RowSpec, pack_sampling
from flying_jax.sampling.params import (MAX_LOGPROBS, SAMPLING_EPS, SamplingParams,
                                        StructuredOutputsParams)

__all__ = [
    "MAX_LOGPROBS", "PARTIAL_TOP_K", "SAMPLING_EPS", "TOPN", "RowSpec", "SampleOut", "SamplingBatch",
    "SamplingParams", "StructuredOutputsParams", "apply_penalties", "apply_token_mask",
    "apply_top_k_top_p", "mask_words", "pack_sampling", "process_logits", "sample",
]

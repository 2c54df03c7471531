"""flying-jax: a JAX serving system that switches between data and tensor parallelism."""

from flying_jax.offline import LLM, CompletionOutput, RequestOutput
from flying_jax.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]

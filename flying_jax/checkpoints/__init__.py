"""Checkpoint readers: GGUF, safetensors and random weights, streamed one tensor at a time
(`iter_tensors`) or stacked into one canonical float32 layout (`load_checkpoint`)."""

from flying_jax.checkpoints.gguf_reader import (
    GGUFFile, GGUFTensor, dequantize, load_gguf, permute_rope_rows, read_gguf, resolve_gguf_path,
    unpermute_rope_rows, verify_sha256)
from flying_jax.checkpoints.loader import (Tensor, check_shapes, expected_shapes, iter_tensors,
                                          load_checkpoint)
from flying_jax.checkpoints.random_init import iter_random, random_weights
from flying_jax.checkpoints.safetensors_reader import (
    architecture_from_hf_config, hf_config_from_architecture, load_safetensors_dir,
    save_safetensors_dir)

__all__ = [
    "GGUFFile", "GGUFTensor", "Tensor", "architecture_from_hf_config", "check_shapes", "dequantize",
    "expected_shapes", "hf_config_from_architecture", "iter_random", "iter_tensors", "load_checkpoint", "load_gguf",
    "load_safetensors_dir", "permute_rope_rows", "random_weights", "read_gguf", "resolve_gguf_path",
    "save_safetensors_dir", "unpermute_rope_rows", "verify_sha256",
]

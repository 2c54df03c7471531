"""The streaming loader holds about one tensor on the host at a time (measured in fresh
processes on a small bf16 checkpoint), and places the same weights as the whole-model path."""

from flying_jax.bench import loading


def test_streaming_loader_peak_is_a_few_tensors_not_the_model(tmp_path):
  arch = loading.arch_of(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64,
                         ffn_dim=4096, vocab_size=16384)
  path = loading.write(arch, str(tmp_path / "ckpt"), "bfloat16")
  stream = loading.measure(path, "stream")
  whole = loading.measure(path, "whole")
  assert stream["weights"] == whole["weights"] == 2 * arch.param_count()
  assert stream["checksum"] == whole["checksum"]                  # the same weights placed
  largest_f32 = 2 * stream["largest_tensor"]                       # bf16 resident
  report = loading.table([stream, whole])
  assert loading.overhead(stream) < 3 * largest_f32, report
  # the whole-model path holds the canonical float32 model at once: the contrast is real
  assert loading.overhead(whole) > 4 * arch.param_count() * 0.9, report

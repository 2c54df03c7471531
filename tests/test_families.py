"""Model families against Hugging Face transformers: tiny randomly initialised Llama, Mistral
(a sliding window of 8 that binds), Qwen3 (q/k norms) and Gemma 3 (sandwich norms stored minus
one, a sliding and a global layer with their own RoPE bases, a query scale other than head_dim)
and Mixtral (4 experts, top 2, each split by FFN columns) saved with `save_pretrained`, made into cards with `card --from-hf`, served at every width; the
logits of every greedy step match transformers' forward on the same ids. Norm weights are
perturbed away from their initial ones so that a norm read wrongly shows."""

import dataclasses

import numpy as np
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.presets.from_hf import card_from_hf
from flying_jax.sampling import SamplingParams
from helpers import captured_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WIDTHS = (1, 2, 4, 8)
SHAPE = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512,
             rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def hf_model(family: str, path):
  torch.manual_seed(0)
  if family == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
  elif family == "mistral":
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**SHAPE, sliding_window=8))
  elif family == "qwen3":
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE))
  elif family == "mixtral":
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **SHAPE, num_local_experts=4, num_experts_per_tok=2))
  else:
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    shape = {**SHAPE, "tie_word_embeddings": True, "rope_theta": None}
    shape.pop("rope_theta")
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **shape, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, rope_parameters=rope))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.add_(0.1 * torch.randn_like(p))
  model = model.eval()
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.mark.parametrize("family,widths", [("llama", WIDTHS), ("mistral", (1, 8)),
                                           ("qwen3", WIDTHS), ("gemma3", WIDTHS),
                                           ("mixtral", WIDTHS)])
def test_every_width_matches_transformers(family, widths, tmp_path):
  model = hf_model(family, tmp_path / family)
  card_file = tmp_path / f"{family}.toml"
  card_file.write_text(card_from_hf(tmp_path / family, f"tiny-{family}"))
  card = load_model_card(str(card_file))
  a = card.arch
  assert a.family == family and a.n_heads == 6                    # uneven splits at widths 4, 8
  windows = {"mistral": (8, 0, 0.0), "gemma3": (8, 2, 1e4)}.get(family, (0, 0, 0.0))
  assert (a.sliding_window, a.sliding_pattern, a.rope_local_theta) == windows
  assert a.attn_scale == (24 if family == "gemma3" else 16) ** -0.5
  assert (a.n_experts, a.experts_per_token) == ((4, 2) if family == "mixtral" else (0, 0))
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,),
                               prefill_chunks=(32,), token_budget=40, partitions=())
  engine = Engine(card, preset, EngineConfig(widths=widths, cache_dir=""))
  prompt = np.random.default_rng(1).integers(0, 512, size=13).tolist()
  params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
  for width in widths:
    engine.set_width(width)
    with captured_logits(engine) as got:
      (seq,) = engine.add_request(f"{family}-{width}", prompt, params)
      while engine.has_unfinished():
        engine.step()
    ids = prompt + seq.output_ids
    with torch.no_grad():
      ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = np.stack(got[seq.seq_id])                     # one row per generated token
    want = ref[len(prompt) - 1:len(ids) - 1]
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4, err_msg=f"width {width}")
    assert seq.output_ids == [int(r.argmax()) for r in want]
    engine.release(f"{family}-{width}")
  assert engine.no_leaks()

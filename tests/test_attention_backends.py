"""The paged-attention backends serve the same tokens: the tiny model (one layer) with the Pallas
kernel (interpret mode on this CPU) against the XLA reference, through a mixed partition (a
width-4 group beside four width-1 groups), decode and chunked prefill, with logits equal within
float32 rounding; an unknown backend is refused before anything is built."""

import dataclasses

import numpy as np
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.sampling import SamplingParams
from helpers import captured_logits


def serve(attention: str):
  card = load_model_card("tiny")
  card = dataclasses.replace(card, arch=dataclasses.replace(card.arch, n_layers=1))
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(4,),
                               prefill_chunks=(16,), token_budget=20)
  engine = Engine(card, preset, EngineConfig(widths=(1, 4), partitions=("4+1x4",),
                                             attention=attention, cache_dir=""))
  rng = np.random.default_rng(0)
  out = {}
  for w in ("4+1x4",):
    engine.set_width(w)
    with captured_logits(engine) as got:
      seqs = [engine.add_request(f"{attention}-{w}-{i}", rng.integers(1, 500, n).tolist(),
                                 SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                                 priority=i % 2)[0]
              for i, n in enumerate((5, 23, 40))]
      while engine.has_unfinished():
        engine.step()
    out[w] = [(s.output_ids, np.stack(got[s.seq_id])) for s in seqs]
  assert engine.no_leaks()
  return out


def test_pallas_kernel_serves_the_reference_tokens():
  want, got = serve("xla"), serve("pallas")
  for w in want:
    for (ids_a, logits_a), (ids_b, logits_b) in zip(want[w], got[w]):
      assert ids_a == ids_b, w
      np.testing.assert_allclose(logits_b, logits_a, atol=1e-4, err_msg=str(w))


def test_unknown_backend_is_refused():
  with pytest.raises(ValueError, match="unknown attention backend"):
    EngineConfig(attention="flash")

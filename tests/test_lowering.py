"""Accelerator programs hold no loop whose trip count the device computes.

The step programs are lowered for GPUs and TPUs on this CPU machine (a lowering needs no device):
with the Pallas attention kernels, every `stablehlo.while` left is a loop of static trip count
(the walk over the stacked layers; the sampling program's halvings); the XLA attention reference, whose
block loop runs a run-time number of times, is the negative control. Also how the layer walk
splits a hybrid model's layers between its page spaces.
"""

import dataclasses

import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.model.decoder import LayerWalk
from flying_jax.runtime.lowering import dynamic_loops, loops, lower_steps

PRESET = dict(decode_buckets=(8,), prefill_chunks=(32,), token_budget=40, partitions=())
KERNEL_CALL = {"cuda": "triton", "tpu": "tpu_custom_call"}


def _card(name: str, layers: int | None = None):
  card = load_model_card(name)
  if layers:
    card = dataclasses.replace(card, arch=dataclasses.replace(card.arch, n_layers=layers))
  return card


@pytest.fixture(scope="module")
def preset():
  return dataclasses.replace(load_mesh_preset("cpu-8"), **PRESET)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("model, layers, widths", [("tiny", None, (1, 2)),
                                                    ("gemma3-270m", 8, (2,))])
def test_accelerator_steps_have_only_static_loops(preset, platform, model, layers, widths):
  """Decode and prefill steps of a Llama and of a hybrid Gemma 3 (8 layers: one period of six and
  a tail of two; two page spaces)."""
  card = _card(model, layers)
  lowered = lower_steps(card, preset, widths, platform, "pallas", pages=64)
  assert len(lowered) == 3 * len(widths)          # two step shapes and the sampler per width
  for key, low in lowered.items():
    text = low.as_text()
    found = loops(text)
    assert found and dynamic_loops(text) == [], (key, [l.cond for l in dynamic_loops(text)])
    assert (KERNEL_CALL[platform] in text) == (key[1] == "step"), key


def test_the_xla_reference_loops_a_run_time_number_of_times(preset):
  """The negative control: the check sees the reference attention's block loop (one per decode
  and per prefill part of a step)."""
  lowered = lower_steps(_card("tiny"), preset, (2,), "cuda", "xla", pages=64)
  counts = sorted(len(dynamic_loops(low.as_text())) for low in lowered.values())
  assert counts == [0, 1, 2]                      # the sampler, a decode step, a mixed step


def test_layer_walk_periods_and_stack_entries():
  uniform = LayerWalk((0,) * 5)
  assert uniform.period == 1 and uniform.index(3, 0) == (3, 3)
  gemma = LayerWalk(tuple(0 if (l + 1) % 6 == 0 else 1 for l in range(26)))   # Gemma 3 1B
  assert gemma.period == 6
  seen = {}
  for j in range(26 // 6 + 1):
    for i in range(6):
      layer, at = gemma.index(j, i)
      if layer < 26:
        seen[layer] = (gemma.spaces[i], at)
  for space in (0, 1):              # each space's layers take its stack's entries in order
    mine = [l for l in range(26) if gemma.spaces[l] == space]
    assert [seen[l] for l in mine] == [(space, n) for n in range(len(mine))]
  assert LayerWalk((1, 0, 1, 0, 1)).period == 2

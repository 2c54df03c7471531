"""Requests the engine refuses up front: bad input, a constraint that does not compile, or longer
than any group it may serve holds."""

from __future__ import annotations

import numpy as np

from flying_jax.sampling import SamplingParams


class RequestRejected(ValueError):
  """A request that can never be served (bad input, or longer than the model or the pool)."""


def validate(engine, prompt_ids, params):
  """Raise RequestRejected saying why `engine` can never serve this prompt with `params`."""
  if not isinstance(params, SamplingParams):
    raise RequestRejected("params must be a SamplingParams")
  if not prompt_ids:
    raise RequestRejected("the prompt is empty")
  v = engine.card.arch.vocab_size
  try:
    ids = np.asarray(prompt_ids)
  except ValueError:
    ids = np.zeros(0)
  if ids.ndim != 1 or ids.dtype.kind not in "iu":
    raise RequestRejected("the prompt must be a list of integer token ids")
  bad = ids[(ids < 0) | (ids >= v)]
  if bad.size:
    raise RequestRejected(f"token ids outside the vocabulary [0, {v}): {bad[:5].tolist()}")
  if params.structured_outputs is not None:
    _check_structured(engine, params.structured_outputs)
  total = len(prompt_ids) + params.max_tokens
  setups = engine.setups
  width = max(engine.partition.widths)
  if engine.policy.dynamic:                       # the policy may move to a wider partition
    width = max(setups, key=lambda w: setups[w].capacity)
  cap = setups[width].capacity
  if total > cap:
    raise RequestRejected(
        f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
        f"the longest sequence this engine can hold ({cap} tokens: model context "
        f"{engine.card.arch.max_context}, KV pool of one width-{width} group, policy "
        f"{engine.policy.name})")


def _check_structured(engine, so):
  """A constraint must compile (llguidance's message otherwise), and the engine must run in one
  process: the followers of a cluster would need every step's token masks."""
  if getattr(engine.executor, "mirror", None) is not None:
    raise RequestRejected("structured output is not supported when the engine runs across "
                          "processes")
  try:
    engine.outputs.check(so)
  except ValueError as e:
    raise RequestRejected(str(e)) from None

"""Sampling metadata of one step: one int32 row of words per sampled row.

The host packs the per-row fields of `flying_jax.sampling` into `[rows, S]` int32 words (the
float32 fields as their bits); the executor puts them in front of the step's packed metadata, so
a step is one transfer, and the sampling program unpacks them. A sequence's row is packed once
(`pack_one`) and copied into each step's words, where only the fields that change while it runs
are written (`set_dynamic`). The token masks of structured output travel apart
(`token_masks`): they are known later than the rest (`runtime.executor`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flying_jax.sampling import SamplingBatch, pack_sampling

_F32 = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
        "frequency_penalty")
_I32 = ("top_k", "seed", "step", "num_logprobs")
SAMPLE_F32 = len(_F32)
_INTS = SAMPLE_F32                          # the int32 fields follow the float32 ones
_HIST = _INTS + len(_I32)                   # then prompt history, output history, banned ids
_STEP = _INTS + _I32.index("step")


def sample_len(hist: int, banned: int) -> int:
  """int32 words of one row's sampling fields."""
  return _HIST + 2 * hist + banned


def pack_rows(batch: SamplingBatch, out: np.ndarray):
  """Write one group's numpy sampling fields (rows leading) into its `[rows, S]` words."""
  fields = vars(batch)
  for j, name in enumerate(_F32):
    out[:, j] = np.asarray(fields[name], np.float32).view(np.int32)
  for j, name in enumerate(_I32):
    out[:, _INTS + j] = fields[name].view(np.int32) if name == "seed" else fields[name]
  h = fields["prompt_hist"].shape[1]
  out[:, _HIST:_HIST + h] = fields["prompt_hist"]
  out[:, _HIST + h:_HIST + 2 * h] = fields["output_hist"]
  out[:, _HIST + 2 * h:] = fields["banned"]


def pack_one(row, hist: int, banned: int) -> np.ndarray:
  """The packed words of one `RowSpec`: what stays the same while its sequence runs, when the
  spec has step 0, no output ids and no banned ids (`set_dynamic` fills those)."""
  out = np.zeros((1, sample_len(hist, banned)), np.int32)
  pack_rows(pack_sampling([row], 1, hist, banned), out)
  return out[0]


def set_dynamic(out: np.ndarray, step: int, output_ids, banned_ids, hist: int, banned: int,
                history: bool):
  """Write the fields of one packed row that change while its sequence runs: the step counter,
  the output history (`history`: the row has penalties) and the banned ids."""
  out[_STEP] = step
  if history and hist:
    tail = output_ids[-hist:] if len(output_ids) > hist else output_ids
    out[_HIST + hist:_HIST + hist + len(tail)] = tail
  if len(banned_ids):
    if len(banned_ids) > banned:
      raise ValueError(f"{len(banned_ids)} banned ids exceed max_banned={banned}")
    out[_HIST + 2 * hist:_HIST + 2 * hist + len(banned_ids)] = banned_ids


def unpack_sampling(s_RxS, hist: int, banned: int) -> SamplingBatch:
  fl = jax.lax.bitcast_convert_type(s_RxS[:, :SAMPLE_F32], jnp.float32)
  fl = {name: fl[:, j] for j, name in enumerate(_F32)}
  it = {name: s_RxS[:, _INTS + j] for j, name in enumerate(_I32)}
  it["seed"] = jax.lax.bitcast_convert_type(it["seed"], jnp.uint32)
  n = _HIST
  return SamplingBatch(
      **fl, **it, prompt_hist=s_RxS[:, n:n + hist], output_hist=s_RxS[:, n + hist:n + 2 * hist],
      banned=s_RxS[:, n + 2 * hist:n + 2 * hist + banned])


def sampled_rows(work, shape) -> list[tuple]:
  """(sequence, group, sampled row) of every row of a span's step that samples a token."""
  rows = []
  for g, w in enumerate(work):
    rows += [(seq, g, shape.sampled_row(i, prefill=False)) for i, seq in enumerate(w.decode)]
    rows += [(p.seq, g, shape.sampled_row(j, prefill=True))
             for j, p in enumerate(w.prefills) if p.samples]
  return rows


def token_masks(work, shape, rows: int, words: int, fill) -> np.ndarray | None:
  """A span's token masks `[groups, rows, words]` (int32, llguidance's layout): all ones (free)
  but the rows `fill(sampled_rows, out)` writes, which returns how many it wrote (None: none)."""
  out = np.full((len(work), rows, words), -1, np.int32)
  return out if fill(sampled_rows(work, shape), out) else None

"""Host side: one engine step's rows -> a `SamplingBatch` of numpy arrays with fixed shapes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from flying_jax.sampling.device import SamplingBatch
from flying_jax.sampling.params import SamplingParams

_SEED_MASK = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """One sequence's row in a sampling batch.

  `seed` is always an int: the caller derives a deterministic per-request seed when `params.seed` is
  None. `step` is the number of tokens the sequence has generated so far. The ids are sequences or
  numpy arrays of token ids (int32 arrays are cheapest: lists are converted on every step, though
  only their last `hist_len` ids, and only for rows with penalties); `banned_ids` are forbidden for
  this step only (e.g. stop ids while below `min_tokens`).
  """

  params: SamplingParams
  seed: int
  step: int
  prompt_ids: Sequence[int] | np.ndarray = ()
  output_ids: Sequence[int] | np.ndarray = ()
  banned_ids: Sequence[int] | np.ndarray = ()


def _tail(ids, length: int) -> np.ndarray:
  """The last `length` ids as int32 (slices before converting, so long lists stay cheap)."""
  if length <= 0:
    return np.zeros((0,), np.int32)
  return np.asarray(ids[-length:] if len(ids) > length else ids, dtype=np.int32).reshape(-1)


def _empty_batch(num_rows: int, hist_len: int, max_banned: int) -> dict[str, np.ndarray]:
  """Arrays for `num_rows` padding rows: greedy, no filters, no penalties, no logprobs."""
  return dict(
      temperature=np.zeros((num_rows,), np.float32),
      top_k=np.zeros((num_rows,), np.int32),
      top_p=np.ones((num_rows,), np.float32),
      min_p=np.zeros((num_rows,), np.float32),
      seed=np.zeros((num_rows,), np.uint32),
      step=np.zeros((num_rows,), np.int32),
      repetition_penalty=np.ones((num_rows,), np.float32),
      presence_penalty=np.zeros((num_rows,), np.float32),
      frequency_penalty=np.zeros((num_rows,), np.float32),
      prompt_hist=np.full((num_rows, hist_len), -1, np.int32),
      output_hist=np.full((num_rows, hist_len), -1, np.int32),
      banned=np.full((num_rows, max_banned), -1, np.int32),
      num_logprobs=np.full((num_rows,), -1, np.int32),
  )


def _fill_row(a: dict[str, np.ndarray], i: int, row: RowSpec, hist_len: int, max_banned: int):
  """Writes row `i` of the arrays from `row`."""
  p = row.params
  a["temperature"][i] = p.temperature
  a["top_k"][i] = p.top_k
  a["top_p"][i] = p.top_p
  a["min_p"][i] = p.min_p
  a["seed"][i] = row.seed & _SEED_MASK
  a["step"][i] = row.step
  a["num_logprobs"][i] = -1 if p.logprobs is None else p.logprobs
  if p.has_penalties:   # histories only matter to rows with penalties
    a["repetition_penalty"][i] = p.repetition_penalty
    a["presence_penalty"][i] = p.presence_penalty
    a["frequency_penalty"][i] = p.frequency_penalty
    prompt = _tail(row.prompt_ids, hist_len)
    a["prompt_hist"][i, :prompt.size] = prompt
    output = _tail(row.output_ids, hist_len)
    a["output_hist"][i, :output.size] = output
  if len(row.banned_ids):
    banned = np.asarray(row.banned_ids, np.int32).reshape(-1)
    if banned.size > max_banned:
      raise ValueError(f"row {i}: {banned.size} banned ids exceed max_banned={max_banned}")
    a["banned"][i, :banned.size] = banned


def pack_sampling(rows: Sequence[RowSpec | None], num_rows: int, hist_len: int,
                  max_banned: int) -> SamplingBatch:
  """Packs up to `num_rows` rows (None = padding) into a `SamplingBatch` of numpy arrays.

  Shapes: [num_rows] per-row controls, [num_rows, hist_len] prompt / output histories (the most
  recent `hist_len` ids, -1 padded, filled only for rows with penalties), [num_rows, max_banned]
  banned ids. Rows past `len(rows)` are padding.
  """
  if len(rows) > num_rows:
    raise ValueError(f"{len(rows)} rows do not fit in num_rows={num_rows}")
  arrays = _empty_batch(num_rows, hist_len, max_banned)
  for i, row in enumerate(rows):
    if row is not None:
      _fill_row(arrays, i, row, hist_len, max_banned)
  return SamplingBatch(**arrays)

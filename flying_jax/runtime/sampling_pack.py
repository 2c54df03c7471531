"""Sampling metadata of one step as two packed arrays per group (float32 and int32).

The host packs the per-row fields of `flying_jax.sampling` into `[groups, rows, F]` float32 and
`[groups, rows, I]` int32 arrays (two transfers per step); the sampling program unpacks them. A
sequence's row is packed once (`pack_one`) and copied into each step's arrays, where only the
fields that change while it runs are written (`set_dynamic`).
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
_STEP = _I32.index("step")


def sample_i32_len(hist: int, banned: int) -> int:
  return len(_I32) + 2 * hist + banned


def pack_rows(batch: SamplingBatch, out_f: np.ndarray, out_i: np.ndarray):
  """Write one group's numpy sampling fields (rows leading) into its slices of the packed arrays."""
  fields = vars(batch)
  for j, name in enumerate(_F32):
    out_f[:, j] = fields[name]
  for j, name in enumerate(_I32):
    out_i[:, j] = fields[name].view(np.int32) if name == "seed" else fields[name]
  h = fields["prompt_hist"].shape[1]
  n = len(_I32)
  out_i[:, n:n + h] = fields["prompt_hist"]
  out_i[:, n + h:n + 2 * h] = fields["output_hist"]
  out_i[:, n + 2 * h:] = fields["banned"]


def pack_one(row, hist: int, banned: int) -> tuple[np.ndarray, np.ndarray]:
  """The packed (float32, int32) row of one `RowSpec`: what stays the same while its sequence
  runs, when the spec has step 0, no output ids and no banned ids (`set_dynamic` fills those)."""
  f = np.zeros((1, SAMPLE_F32), np.float32)
  i = np.zeros((1, sample_i32_len(hist, banned)), np.int32)
  pack_rows(pack_sampling([row], 1, hist, banned), f, i)
  return f[0], i[0]


def set_dynamic(out_i: np.ndarray, step: int, output_ids, banned_ids, hist: int, banned: int,
                history: bool):
  """Write the fields of one packed int32 row that change while its sequence runs: the step
  counter, the output history (`history`: the row has penalties) and the banned ids."""
  n = len(_I32)
  out_i[_STEP] = step
  if history and hist:
    tail = output_ids[-hist:] if len(output_ids) > hist else output_ids
    out_i[n + hist:n + hist + len(tail)] = tail
  if len(banned_ids):
    if len(banned_ids) > banned:
      raise ValueError(f"{len(banned_ids)} banned ids exceed max_banned={banned}")
    out_i[n + 2 * hist:n + 2 * hist + len(banned_ids)] = banned_ids


def unpack_sampling(f_RxF, i_RxI, hist: int, banned: int) -> SamplingBatch:
  n = len(_I32)
  fl = {name: f_RxF[:, j] for j, name in enumerate(_F32)}
  it = {name: i_RxI[:, j] for j, name in enumerate(_I32)}
  it["seed"] = jax.lax.bitcast_convert_type(it["seed"], jnp.uint32)
  return SamplingBatch(
      **fl, **it, prompt_hist=i_RxI[:, n:n + hist], output_hist=i_RxI[:, n + hist:n + 2 * hist],
      banned=i_RxI[:, n + 2 * hist:n + 2 * hist + banned])

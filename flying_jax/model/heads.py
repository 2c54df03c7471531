"""Which attention heads each device of a width-w group computes, with exact zero padding.

A width-w group splits the KV heads over its devices; every device holds its KV heads and the query
heads that read them, so attention never crosses devices. When the KV heads do not divide w, the
missing slots are padding (index -1: zero weights, zero output); when w is larger than the number of
KV heads, each KV head is replicated on `w / kv_pad` devices and its query heads are split among them.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from flying_jax.config import Architecture


@dataclasses.dataclass(frozen=True)
class HeadPlan:
  """Head assignment for one width. Index -1 marks a padded (all-zero) head."""
  width: int
  kv_per_device: int
  q_per_kv: int                   # query heads per KV head on one device (padded group size)
  q_index: np.ndarray             # [width, kv_per_device * q_per_kv] global query head, or -1
  kv_index: np.ndarray            # [width, kv_per_device] global KV head, or -1

  @property
  def q_per_device(self) -> int:
    return self.kv_per_device * self.q_per_kv

  @property
  def is_identity(self) -> bool:
    """Width 1 with no padding: the program uses the resident weights as they are."""
    return self.width == 1 and bool((self.q_index >= 0).all()) and bool((self.kv_index >= 0).all())

  def padded_q_heads(self) -> int:
    return int((self.q_index < 0).sum())

  def kv_head_copies(self) -> int:
    """KV head slots over the group (padding and replicas included)."""
    return self.width * self.kv_per_device


def plan_heads(arch: Architecture, width: int) -> HeadPlan:
  hkv, g = arch.n_kv_heads, arch.group_size
  if width <= hkv:
    kvpd, rep, gpd = math.ceil(hkv / width), 1, g
  else:
    kv_pad = next(d for d in range(hkv, width + 1) if width % d == 0)
    kvpd, rep = 1, width // kv_pad
    gpd = math.ceil(g / rep)
  q_index = np.full((width, kvpd * gpd), -1, np.int32)
  kv_index = np.full((width, kvpd), -1, np.int32)
  for d in range(width):
    for s in range(kvpd):
      kv = (d // rep) * kvpd + s
      if kv >= hkv:
        continue
      kv_index[d, s] = kv
      part = d % rep
      for j in range(gpd):
        qi = part * gpd + j
        if qi < g:
          q_index[d, s * gpd + j] = kv * g + qi
  plan = HeadPlan(width, kvpd, gpd, q_index, kv_index)
  _check(plan, arch)
  return plan


def _check(plan: HeadPlan, arch: Architecture):
  """Every real query head is computed exactly once, next to its own KV head."""
  q = plan.q_index[plan.q_index >= 0]
  if sorted(q.tolist()) != list(range(arch.n_heads)):
    raise AssertionError(f"head plan for width {plan.width} does not cover each query head once")
  for d in range(plan.width):
    for slot, h in enumerate(plan.q_index[d]):
      if h >= 0 and plan.kv_index[d, slot // plan.q_per_kv] != h // arch.group_size:
        raise AssertionError(f"query head {h} placed away from its KV head at width {plan.width}")


def padding_report(arch: Architecture, width: int) -> dict:
  """Extra attention FLOPs and KV bytes that padding and replication cost at this width."""
  plan = plan_heads(arch, width)
  hd, dim = arch.head_dim, arch.dim
  real = (arch.n_heads + 2 * arch.n_kv_heads) * hd * dim + arch.n_heads * hd * dim
  padded = width * ((plan.q_per_device + 2 * plan.kv_per_device) * hd * dim
                    + plan.q_per_device * hd * dim)
  return {
      "width": width,
      "q_heads_per_device": plan.q_per_device,
      "kv_heads_per_device": plan.kv_per_device,
      "padded_q_heads": plan.padded_q_heads(),
      "attn_proj_flops_extra": padded / real - 1.0,
      "kv_bytes_per_token_extra": plan.kv_head_copies() / arch.n_kv_heads - 1.0,
  }

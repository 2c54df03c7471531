"""Simulated hardware: what one machine's chips can do, and how a model fits on them.

A hardware preset (`meshes/hardware/*.toml`) names the mesh preset whose batching and KV paging it
uses, and gives per-chip figures: peak FLOP/s, HBM bandwidth and size, interconnect bandwidth and
collective latency, the achievable shares of peak, and the host's cost per step. The local CPU
preset (`cpu`) is measured instead: its `fitted` coefficients come from `flying-jax sim calibrate`.

`plan` sizes a model on a preset the way the engine allocates it: the narrowest base width (chips
holding one copy of the weights, each its shard) that leaves room for KV is the data-parallel
width, and the KV pages per device are what HBM holds after the weights (`weights_on` counts the
bytes the engine's layout places on each chip; `kv_layout` the KV pools, a hybrid model's sliding
layers in smaller pools of their own).
"""

from __future__ import annotations

import dataclasses
import tomllib

from flying_jax.config import (ConfigError, MeshPreset, ModelCard, _fields, find,
                               load_mesh_preset)
from flying_jax.config import available as config_available
from flying_jax.parallel import Partition



class SimError(ValueError):
  """The model does not fit the simulated machine, or a preset is unusable."""


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  mesh: str                          # the mesh preset: batching, widths, partitions, paging
  devices: int
  description: str = ""
  peak_tflops: float = 0.0           # dense, in the preset's dtype, per chip
  hbm_gbps: float = 0.0              # GB/s per chip
  hbm_gb: float = 0.0                # GB per chip (0: the mesh preset's pages_per_device)
  link_gbps: float = 0.0             # GB/s per chip per direction, for collectives
  collective_latency_us: float = 0.0
  hosts: int = 1                     # nodes the chips are spread over (devices / hosts each)
  internode_gbps: float = 0.0        # GB/s per chip per direction between nodes
  internode_latency_us: float = 0.0  # added to an all-reduce that crosses nodes
  mfu: float = 0.6
  mbu: float = 0.8
  memory_utilization: float = 0.9
  step_overhead_ms: float = 0.0      # host work per step
  overlap: bool = True               # a span's compute and memory traffic overlap (its time is
  #                                    the larger of the two) or not (their sum)
  switch_ms: float = 0.2             # host work per partition switch
  shared_cores: bool = False         # simulated devices share the host's cores (the CPU mesh)
  fitted: tuple = ()                 # measured cost coefficients (see cost.Measured)
  calibrated: str = ""               # where and when `fitted` was measured
  measured: tuple = ()               # step times measured on one chip (`sim.reference.Point`)

  def __post_init__(self):
    if self.devices < 1:
      raise ConfigError(f"hardware {self.name}: devices must be >= 1")
    if self.hosts < 1 or self.devices % self.hosts:
      raise ConfigError(f"hardware {self.name}: hosts must divide the {self.devices} chips")
    if self.hosts > 1 and self.internode_gbps <= 0:
      raise ConfigError(f"hardware {self.name}: several hosts need internode_gbps > 0")
    if not self.fitted and min(self.peak_tflops, self.hbm_gbps) <= 0:
      raise ConfigError(f"hardware {self.name}: peak_tflops and hbm_gbps must be > 0 (or give "
                        f"fitted coefficients)")


def available() -> list[str]:
  return config_available("hardware")


def load_hardware(name: str) -> Hardware:
  source = find("hardware", name)
  return _fields(Hardware, tomllib.loads(source.read_text()), source.where)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A model sized on a machine: the mesh preset to simulate and what it holds."""
  preset: MeshPreset                 # base width and widths from HBM, pages from what is left
  widths: tuple[int, ...]
  weight_bytes: int                  # one engine's copy
  device_weight_bytes: int           # what one device holds of it
  page_bytes: int                    # one page, K and V of every layer that reads the page table
  pages: int                         # per device
  local_page_bytes: int = 0          # a hybrid model: one page of its sliding layers' own pools
  local_pages: int = 0               # ... and their pages per device (`kv.window`)

  @property
  def device_kv_bytes(self) -> int:
    """The KV pools one device holds, as the engine allocates them."""
    return self.pages * self.page_bytes + self.local_pages * self.local_page_bytes

  @property
  def dp_width(self) -> int:
    return self.widths[0]

  @property
  def base_width(self) -> int:
    return self.preset.base_width

  def pool_tokens(self, width: int) -> int:
    """Tokens of KV one group of `width` holds (whatever the model's context limit)."""
    return (self.pages - 1) * self.preset.page_tokens * width


def dtype_bytes(preset: MeshPreset) -> int:
  return {"float32": 4, "bfloat16": 2, "float16": 2}[preset.dtype]


def weights_on(card: ModelCard, preset: MeshPreset) -> tuple[int, int]:
  """(one engine's weight bytes, one device's) as the engine lays them out on `preset`."""
  from flying_jax.model.heads import row_blocks
  from flying_jax.model.tables import resident_bytes

  blocks = row_blocks(card.arch, preset.widths, preset.base_width)
  return resident_bytes(card.arch, blocks, dtype_bytes(preset))


def plan(card: ModelCard, hw: Hardware, mesh: str | MeshPreset | None = None) -> Plan:
  """`card` sized on `hw` with `mesh` (default: the hardware's mesh preset) as the engine would
  allocate it: the narrowest base width (devices per copy of the weights, from the preset's own
  up) whose shard leaves room for KV; widths from it up; the KV pages per device are what HBM
  holds after the weights."""
  preset = mesh if isinstance(mesh, MeshPreset) else load_mesh_preset(mesh or hw.mesh)
  if preset.devices != hw.devices:
    raise SimError(f"hardware {hw.name} has {hw.devices} chips, mesh {preset.name} "
                   f"{preset.devices}")
  if preset.hosts != hw.hosts:
    raise SimError(f"hardware {hw.name} spreads its chips over {hw.hosts} host(s), mesh "
                   f"{preset.name} over {preset.hosts}")
  if hw.hbm_gb <= 0:                  # measured hardware: the preset's pool, every width
    return Plan(preset, preset.widths, *weights_on(card, preset),
                *kv_layout(card, preset, preset.pages_per_device))
  usable = hw.hbm_gb * 1e9 * hw.memory_utilization
  for t in (w for w in preset.widths if w >= preset.base_width):
    widths = tuple(x for x in preset.widths if x >= t)
    parts = tuple(p for p in preset.partitions
                  if set(Partition.parse(p, preset.devices).widths) <= set(widths))
    sized = dataclasses.replace(preset, base_width=t, widths=widths, partitions=parts)
    engine_bytes, device_bytes = weights_on(card, sized)
    room = usable - device_bytes
    if room >= 0.05 * usable:
      break
  else:
    raise SimError(f"{card.name} ({engine_bytes / 1e9:.0f} GB of weights) does not fit "
                   f"{hw.name}: even engines of {max(preset.widths)} chips leave no room for KV "
                   f"({hw.devices} x {hw.hbm_gb:.0f} GB)")
  pages = pages_in(card, sized, room)
  sized = dataclasses.replace(sized, pages_per_device=pages)
  return Plan(sized, widths, engine_bytes, device_bytes, *kv_layout(card, sized, pages))


def kv_layout(card: ModelCard, preset: MeshPreset, pages: int,
              config=None) -> tuple[int, int, int, int]:
  """(page bytes, pages, local page bytes, local pages) per device as the engine allocates
  `pages` per device under `config` (an `EngineConfig`, default the default one;
  `engine.setup.page_spaces`: a hybrid model's sliding layers in pools of their own)."""
  from flying_jax.engine.setup import EngineConfig, page_spaces

  a = card.arch
  per_layer = preset.page_tokens * a.n_kv_heads * a.head_dim * 2 * dtype_bytes(preset)
  spaces = page_spaces(card, preset, config or EngineConfig(cache_dir=None), pages)
  (glob, _), *local = spaces
  if not local:
    return per_layer * len(glob), pages, 0, 0
  return per_layer * len(glob), pages, per_layer * len(local[0][0]), local[0][1]


def pages_in(card: ModelCard, preset: MeshPreset, room: float) -> int:
  """The most pages per device whose pools (`kv_layout`) fit `room` bytes."""
  def fits(p):
    page, _, local_page, local = kv_layout(card, preset, p)
    return p * page + local * local_page <= room
  if not fits(1):
    return 0
  lo, hi = 1, 2
  while fits(hi):
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo

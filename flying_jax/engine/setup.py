"""Start-up: weights placed once, KV pools allocated, every program compiled and warmed.

`EngineConfig` is the frozen set of knobs; `build_runtime` turns a model card, a mesh preset and
the partitions to serve into the resident weights, the device pools, the program registry and the
executor (a `Runtime`), and reports what it did.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp

from flying_jax.config import MeshPreset, ModelCard
from flying_jax.engine.report import StartupReport  # noqa: F401  (engines make theirs here)
from flying_jax.kv import DevicePools, PageLayout, PagePool
from flying_jax.kv import window as kw
from flying_jax.model import weights as W
from flying_jax.model.attention import KVGeometry
from flying_jax.model.batch import StepShape
from flying_jax.model.decoder import LayerWalk
from flying_jax.model.heads import (RowBlocks, padding_report, plan_heads, row_blocks,
                                    shard_reads)
from flying_jax.parallel import MeshSpecs, Partition, Span, mesh_for_span
from flying_jax.runtime.exec_cache import ExecutableCache
from flying_jax.runtime.executor import Executor
from flying_jax.runtime.programs import ProgramRegistry, WidthSetup
from flying_jax.runtime.resident import Resident

log = logging.getLogger("flying_jax")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  widths: tuple[int, ...] | None = None   # widths to compile (default: all the preset allows)
  width: int | None = None                # the partition served (default: the smallest width)
  partitions: tuple[str, ...] | None = None
  # ^ mixed partitions to compile (default: those of the preset whose widths are all compiled)
  hist_len: int = 256                     # tokens of history seen by the penalties
  max_banned: int = 8                     # ids banned per row (stop ids below min_tokens)
  cache_dir: str | None = dataclasses.field(default_factory=lambda: default_cache_dir())
  # ^ where compiled step and migration programs persist between runs, serialized under
  #   <cache_dir>/executables (`runtime.exec_cache`; "" or None: off). JAX's own persistent
  #   cache stays off: an executable it loaded could not be serialized again here
  pages_per_device: int | None = None     # override the preset's KV pool size
  progress: bool = False                  # a progress bar while compiling
  max_pause_s: float = 10.0               # a paused sequence waits at most this long, under any
  # ^ policy or pin; then it prefills again in the partition in force
  free_window_pages: bool = True          # a model whose every layer slides gives back the pages
  # ^ wholly before each sequence's window while it runs; a hybrid model (Gemma 3) keeps its
  #   sliding layers' KV in pools of their own holding the window only, decided at start-up
  #   (False: every layer keeps every page in pools of one size, the reference)
  local_pages_per_device: int | None = None   # pages per device of a hybrid model's sliding-layer
  # ^ pools (default: `kv.window.default_local_pages`)
  attention: str = "auto"                 # paged-attention backend: "xla" (the reference: a loop
  # ^ over blocks whose trip count is data), "pallas" (a Pallas kernel: Triton on GPUs, Mosaic on
  #   TPUs, interpret mode on CPUs as a correctness check) or "auto" (pallas on accelerators,
  #   where the reference's loop would return to the host every block; xla on CPUs)
  prefix_cache: bool = True               # share full KV pages between requests that start
  # ^ with the same tokens (`kv.prefix`; off for models with sliding layers)
  overlap: bool = True                    # launch step n+1 before reading step n's sampled ids
  # ^ (the host schedules and packs while the device runs; decode slots read their token from
  #   the previous step on the device). Greedy ids are the same either way
  defer_masks: bool = True                # structured output: a step whose constrained rows'
  # ^ previous tokens are still on the device launches its step program at once and samples
  #   once they are collected, the masks computed meanwhile (False: it waits for the collect)

  def __post_init__(self):
    from flying_jax.model.attention import BACKENDS
    if self.attention not in BACKENDS + ("auto",):
      raise ValueError(f"unknown attention backend {self.attention!r}; known: auto, "
                       f"{', '.join(BACKENDS)}")


def attention_for(name: str, platform: str) -> str:
  """The backend `name` ("auto" resolved) on devices of `platform`."""
  if name != "auto":
    return name
  return "xla" if platform == "cpu" else "pallas"


def default_cache_dir() -> str:
  """Where compiled programs persist between runs: $XDG_CACHE_HOME/flying-jax/xla."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "flying-jax", "xla")


def width_setup(card: ModelCard, preset: MeshPreset, devices, span: Span | int,
                pages: int, specs=None, blocks: RowBlocks | None = None,
                local_tables: bool = False) -> WidthSetup:
  """The static set-up of one span (a bare width: the uniform partition's span over all devices).

  `specs` default: the span's mesh over `devices` (the simulator passes its own, without JAX).
  `blocks`: the rows each device of an engine holds (default: those this width alone needs).
  `local_tables`: the steps carry a hybrid model's sliding-layer page tables too."""
  if isinstance(span, int):
    span = Span(0, len(devices), span)
  width = span.width
  arch = card.arch
  base = preset.base_width
  blocks = blocks or row_blocks(arch, (width,), base)
  plan = shard_reads(plan_heads(arch, width), blocks, arch.ffn_dim)
  slots = preset.page_tokens * arch.n_kv_heads
  tpp = slots // plan.kv_per_device
  ppb = max(1, preset.attention_block_tokens // tpp)
  capacity = min(arch.max_context, (pages - 1) * tpp)
  max_pages = _round_up(_ceil_div(capacity, tpp), ppb)
  geom = KVGeometry(slots=slots, kv_per_device=plan.kv_per_device, pages_per_block=ppb,
                    max_pages=max_pages)
  prefill = [(0, 0)] + [(r, c // r) for c in preset.prefill_chunks for r in preset.prefill_rows
                        if c // r > 0]
  shapes = tuple(StepShape(d, c, max_pages, r, local_tables) for d in preset.decode_buckets
                 for r, c in prefill)
  if specs is None:
    specs = MeshSpecs(mesh_for_span(devices, span, base))
  return WidthSetup(specs, plan, geom, shapes, capacity, span, base)


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _round_up(a: int, b: int) -> int:
  return _ceil_div(a, b) * b


def layout_of(ws: WidthSetup) -> PageLayout:
  return PageLayout(ws.width, ws.geom.kv_per_device, ws.geom.tokens_per_page, ws.base)


def page_spaces(card: ModelCard, preset: MeshPreset, cfg: EngineConfig,
                pages: int) -> tuple[tuple[tuple[int, ...], int], ...]:
  """(layers, pages per device) of each page space: every layer in one, or a hybrid model's
  global layers and then its sliding layers in pools of their own (`kv.window`)."""
  arch = card.arch
  layers = tuple(range(arch.n_layers))
  if not (arch.hybrid and cfg.free_window_pages):
    return ((layers, pages),)
  row = max(preset.prefill_chunks)             # the longest prefill row
  fewest = min(pages, kw.min_local_pages(arch.sliding_window, preset.page_tokens, row))
  local = cfg.local_pages_per_device or kw.default_local_pages(
      pages, arch.sliding_window, preset.page_tokens, row)
  if local < fewest:
    raise ValueError(f"local_pages_per_device={local} cannot hold one sequence's window and a "
                     f"prefill chunk of {row} tokens: it needs {fewest} pages or more")
  sliding = tuple(l for l in layers if arch.sliding(l))
  return (tuple(l for l in layers if l not in sliding), pages), (sliding, local)


def mixed_partitions(preset: MeshPreset, widths, requested, devices=()) -> dict[str, Partition]:
  """The mixed partitions to compile, by name; refuses any the preset or the widths do not allow.

  `requested` None: every partition the preset lists whose widths are all compiled. `devices`
  held by several processes: the preset must be laid out for that many hosts, and no mixed
  partition is compiled (a span's programs would run on one process's devices only).
  """
  processes = len({getattr(d, "process_index", 0) for d in devices})
  if processes > 1 and processes != preset.hosts:
    raise ValueError(f"mesh {preset.name} is laid out for {preset.hosts} host(s); its devices "
                     f"are held by {processes} processes (use a preset whose `hosts` says so, "
                     f"e.g. cpu-2x4, gpu-2x8, tpu-v5e-16)")
  if processes > 1:
    if requested:
      raise ValueError("mixed partitions are not served across processes yet: their spans' "
                       "programs would run on one process's devices only")
    return {}
  parsed = (Partition.parse(p, preset.devices) for p in preset.partitions)
  allowed = {p.name: p for p in parsed}
  if requested is None:
    return {n: p for n, p in allowed.items() if set(p.widths) <= set(widths)}
  out = {}
  for spec in requested:
    part = Partition.parse(spec, preset.devices)
    if part.uniform_width is not None:
      raise ValueError(f"partition {part.name} is uniform: choose it with widths, not partitions")
    if part.name not in allowed:
      raise ValueError(f"mesh {preset.name} does not allow partition {part.name} (allowed mixed "
                       f"partitions: {sorted(allowed) or 'none'}); add it to the preset's "
                       f"`partitions`")
    missing = sorted(set(part.widths) - set(widths))
    if missing:
      raise ValueError(f"partition {part.name} needs widths {missing}, which are not compiled "
                       f"(compiled: {tuple(widths)})")
    out[part.name] = part
  return out


def dtype_of(preset: MeshPreset):
  return jnp.dtype(preset.dtype)


def describe_programs(registry: ProgramRegistry) -> list[str]:
  """One line per span: the step shapes compiled and the slowest compile."""
  lines = []
  for span, ws in registry.setups.items():
    stats = [st for st in registry.stats if st.key[0] == span]
    shapes = ", ".join(f"{s.decode}+{s.pre_rows}x{s.chunk}" for s in ws.shapes)
    slow = max(stats, key=lambda st: st.compile_s)
    loaded = sum(st.loaded for st in stats)
    lines.append(f"{_span_words(span)}: {len(stats)} programs (steps decode+prefill {shapes}; "
                 f"sampling{f'; {loaded} loaded from the cache' if loaded else ''}), "
                 f"{sum(st.compile_s for st in stats):.1f}s, slowest {slow.compile_s:.1f}s")
  return lines


def _span_words(span: Span) -> str:
  return f"width {span.width} on devices {span.first}-{span.first + span.devices - 1}"


def build_migrator(card: ModelCard, setups: dict, pools, spaces, cache=None):
  """Migration programs sized for the longest sequence any width holds; for a hybrid model's
  sliding-layer pools (the second of `spaces`), for the window and a page."""
  from flying_jax.kv.migrate import MigrationPrograms

  arch = card.arch
  copies = max(ws.width * ws.plan.kv_per_device for ws in setups.values())
  longest = max(ws.capacity for ws in setups.values())
  page = max(ws.geom.tokens_per_page for ws in setups.values())
  window = min(longest, arch.sliding_window + page)
  more = tuple((pools.struct(space), window * copies * arch.head_dim)
               for space in range(1, len(spaces)))
  any_ws = next(iter(setups.values()))
  return MigrationPrograms(pools.struct(0), any_ws.specs.per_device(),
                           any_ws.specs.replicated(), longest * copies * arch.head_dim, more,
                           cache)


def layout_line(card: ModelCard, rows: RowBlocks, dtype) -> str:
  """What laying every width's heads out as contiguous rows costs in weight memory."""
  a, t = card.arch, rows.base
  extra = 2 * ((t * rows.q_size - a.n_heads) + (t * rows.kv_size - a.n_kv_heads)) * a.head_dim
  mib = extra * a.dim * a.n_layers * jnp.dtype(dtype).itemsize / 2**20
  where = "per layer" if t == 1 else f"per layer on each of an engine's {t} devices"
  return (f"weight layout: {rows.q_size} query / {rows.kv_size} KV head rows {where} for "
          f"{a.n_heads} / {a.n_kv_heads} heads (zero rows so every width reads one contiguous "
          f"run), +{mib:.1f} MiB per engine")


def report_padding(card: ModelCard, widths, rows=None) -> list[dict]:
  return [padding_report(card.arch, w, rows) for w in widths]


@dataclasses.dataclass
class Runtime:
  """What start-up leaves resident for an engine (its attributes of the same names)."""
  pages: int                             # KV pages per device
  span_setups: dict                      # Span -> WidthSetup, every span of every partition
  setups: dict                           # width -> WidthSetup of the uniform partition
  weights: W.ResidentWeights
  device_pools: DevicePools              # whole-mesh KV pools
  pool: PagePool                         # host page tables
  registry: ProgramRegistry
  resident: Resident
  executor: Executor
  migrator: object                       # MigrationPrograms, None with one width
  page_spaces: tuple = ()                # (layers, pages per device) of each page space
  local_pool: PagePool | None = None     # host page tables of a hybrid model's sliding layers
  local_pages: int = 0                   # ... their pages per device (0: no such pools)


def runtime_pools(spaces, n: int) -> tuple[PagePool, PagePool | None, int]:
  """The host page tables of each page space (`page_spaces`) over `n` devices, and the pages
  per device of the second (a hybrid model's sliding layers; 0: none)."""
  pools = [PagePool(n, pages) for _, pages in spaces]
  if len(pools) == 1:
    return pools[0], None, 0
  return pools[0], pools[1], spaces[1][1]


def kv_pools(card: ModelCard, preset: MeshPreset, spaces, n: int, dtype, sharding) -> DevicePools:
  """Zeroed KV pools over `n` devices: per page space, its layers' pools stacked."""
  slots = preset.page_tokens * card.arch.n_kv_heads
  return DevicePools.create(spaces, n, slots, card.arch.head_dim, dtype, sharding)


def layer_walk(card: ModelCard, spaces) -> LayerWalk:
  """The page space of each decoder layer, as the step programs walk them."""
  space_of = {l: i for i, (layers, _) in enumerate(spaces) for l in layers}
  return LayerWalk(tuple(space_of[l] for l in range(card.arch.n_layers)))


def build_runtime(card: ModelCard, preset: MeshPreset, cfg: EngineConfig, devices,
                  partitions: dict[str, Partition], widths, host_weights,
                  rep: StartupReport) -> Runtime:
  """Place the weights, allocate the KV pools, compile and warm every program; fill `rep`."""
  dtype = dtype_of(preset)
  n = len(devices)
  pages = cfg.pages_per_device or preset.pages_per_device
  spaces = page_spaces(card, preset, cfg, pages)
  spans = sorted({sp for p in partitions.values() for sp in p.spans})
  rows = row_blocks(card.arch, sorted({sp.width for sp in spans}), preset.base_width)
  span_setups = {sp: width_setup(card, preset, devices, sp, pages, blocks=rows,
                                 local_tables=len(spaces) > 1) for sp in spans}
  setups = {w: span_setups[Span(0, n, w)] for w in widths}
  specs = setups[widths[0]].specs
  replicated = specs.replicated()
  cache = ExecutableCache(os.path.join(cfg.cache_dir, "executables") if cfg.cache_dir else None)
  t0 = time.perf_counter()
  if host_weights is None and card.weights.format == "orbax":
    from flying_jax.checkpoints.orbax_store import restore_resident
    weights = restore_resident(card.weights.path, card.arch, dtype, specs, rows)
    jax.block_until_ready(weights)
    rep.load_s = time.perf_counter() - t0
  elif host_weights is not None:
    rep.load_s = time.perf_counter() - t0
    weights = W.place(host_weights, card.arch, specs, rows.vocab)
  else:                                 # one tensor at a time: read, convert, place, next
    from flying_jax.checkpoints import iter_tensors
    put = lambda a, split: jax.device_put(a, specs.sharded() if split else replicated)
    compiled = lambda key, jitted, structs, devs: cache.get_or_compile(
        key, lambda: jitted.lower(*structs), devs)[0]
    weights = W.load_resident(iter_tensors(card), card.arch, dtype, rows,
                              lambda a, split: put(a, split).block_until_ready(), compiled)
    jax.block_until_ready(weights)
    rep.load_s = time.perf_counter() - t0
  laid_out = W.rows_of(weights, card.arch.head_dim, rows.base)  # orbax may hold more rows
  if rows.base == 1 and any(have < need for have, need in zip(laid_out, rows.rows)):
    raise ValueError(f"the weights have {laid_out} query/KV rows; widths {tuple(widths)} need "
                     f"{rows.rows} (lay them out with heads.row_blocks)")
  if rows.base == 1:
    rows = RowBlocks.single(laid_out)
  t0 = time.perf_counter()
  device_pools = kv_pools(card, preset, spaces, n, dtype, specs.per_device())
  jax.block_until_ready((weights, device_pools.k, device_pools.v))
  rep.place_s = time.perf_counter() - t0
  rep.attention = attention_for(cfg.attention, devices[0].platform)
  registry = ProgramRegistry(card.arch, dtype, span_setups,
                             [device_pools.device_struct(n, i) for i in range(len(spaces))],
                             cfg.hist_len, cfg.max_banned,
                             max(s.rows for ws in setups.values() for s in ws.shapes),
                             layer_walk(card, spaces), rep.attention, cache)
  bar = _progress(cfg.progress, registry.count())
  rep.compile_s = registry.build(W.abstract(card.arch, dtype, specs, rows), rows, bar)
  if bar is not None:
    bar.close()
  resident = Resident(weights, device_pools, span_setups, n, card.arch)
  executor = Executor(registry, resident, cfg.hist_len, cfg.max_banned)
  t0 = time.perf_counter()
  migrator = (build_migrator(card, setups, device_pools, spaces, cache) if len(widths) > 1
              else None)
  rep.compile_s += time.perf_counter() - t0
  if devices[0].platform != "cpu":
    # on XLA:CPU nothing is set up lazily: a warm start's first steps took as long without a
    # warm-up as after one (SmolLM2, cpu-8, every width), so a CPU start skips it
    rep.warmup_s = executor.warm_up([[span_setups[sp] for sp in p.spans]
                                     for p in partitions.values()])
  rep.programs = len(registry) + (len(migrator) if migrator else 0)
  rep.weight_bytes = weights.nbytes()
  rep.device_weight_bytes = weights.device_nbytes()
  rep.kv_bytes, rep.kv_pages, rep.devices = device_pools.nbytes(), spaces, n
  rep.padding = report_padding(card, widths, laid_out)
  rep.layout = layout_line(card, rows, dtype)
  rep.compiled = describe_programs(registry)
  if cache.enabled:
    rep.cache = cache.stats.summary()
  mixed = [name for name, p in partitions.items() if p.uniform_width is None]
  if mixed:
    rep.compiled.append("mixed partitions: " + ", ".join(mixed))
  for line in rep.lines():
    log.info(line)
  pool, local_pool, local_pages = runtime_pools(spaces, n)
  return Runtime(pages, span_setups, setups, weights, device_pools, pool, registry, resident,
                 executor, migrator, spaces, local_pool, local_pages)


def _progress(enabled: bool, total: int):
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc="compiling programs", unit="prog")

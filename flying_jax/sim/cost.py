"""What a step costs: the work of each span of a partition, and two models that turn it into time.

`span_work` reads the work the engine's scheduler chose for one span, at the compiled step shape
the executor would run (padded rows cost compute, as they do on the device), and counts per device:
matmul FLOPs, attention FLOPs, bytes read (weights once, the KV the busiest group reads), and the
all-reduce traffic of tensor parallelism (two per layer).

  Roofline   accelerators: per span, the larger of compute time (FLOPs over achievable peak) and
             memory time (bytes over achievable bandwidth), or their sum where the preset says
             they do not overlap (as measured on an H200: `sim.reference`), plus per-layer
             all-reduces (latency + ring traffic over the link); spans run side by side, so a
             step takes its slowest span, plus the host's overhead;
  Measured   the local CPU: a linear model of the same quantities whose coefficients are fitted
             to measured step times of the real engine (`calibrate`); the simulated devices share
             the host's cores, so spans add up.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flying_jax.config import Architecture
from flying_jax.model.batch import StepShape


@dataclasses.dataclass(frozen=True)
class SpanWork:
  width: int
  groups: int
  tokens: int              # rows of the compiled shape per group (decode slots + prefill rows)
  flops: float             # per device: matmuls at the padded shape, attention of the busiest group
  bytes: float             # per device: weights + the busiest group's KV reads and writes
  allreduce_bytes: float   # per all-reduce (0 at width 1); two per layer
  sequences: int           # real decode and prefill rows over the span's groups


@dataclasses.dataclass(frozen=True)
class ModelCosts:
  """Per-token constants of a model in a dtype."""
  layers: int
  layer_params: int        # matmul parameters of one decoder layer
  head_params: int         # the logits projection
  dim: int
  head_dim: int
  n_heads: int
  n_kv_heads: int
  dtype_bytes: int

  @staticmethod
  def of(arch: Architecture, dtype_bytes: int) -> "ModelCosts":
    a = arch
    attn = a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
    return ModelCosts(a.n_layers, attn + 3 * a.dim * a.ffn_dim, a.vocab_size * a.dim, a.dim,
                      a.head_dim, a.n_heads, a.n_kv_heads, dtype_bytes)

  def kv_bytes_per_token(self, kv_per_device: int) -> int:
    """K and V of one token on one device, all layers."""
    return 2 * kv_per_device * self.head_dim * self.layers * self.dtype_bytes


def span_work(m: ModelCosts, ws, work: list, shape: StepShape) -> SpanWork:
  """The work of one span: `ws` its WidthSetup, `work` its groups' GroupWork, `shape` compiled."""
  w = ws.width
  kv = attn = 0.0                  # the busiest group's KV tokens read + written, attention pairs
  seqs = 0
  for gw in work:
    decode = len(gw.decode)
    read = pairs = float(sum(s.computed for s in gw.decode) + decode)
    written = decode
    for p in gw.prefills:
      read += p.start + p.length
      written += p.length
      pairs += p.length * (p.start + (p.length + 1) / 2)
    seqs += decode + len(gw.prefills)
    kv, attn = max(kv, read + written), max(attn, pairs)
  q_per_device = ws.plan.q_per_device
  flops = (2.0 * shape.tokens * m.layer_params * m.layers / w + 2.0 * shape.rows * m.head_params / w
           + 4.0 * attn * q_per_device * m.head_dim * m.layers)
  data = ((m.layer_params * m.layers + m.head_params) * m.dtype_bytes / w
          + kv * m.kv_bytes_per_token(ws.plan.kv_per_device))
  ar = shape.tokens * m.dim * m.dtype_bytes if w > 1 else 0.0
  return SpanWork(w, len(work), shape.tokens, flops, data, ar, seqs)


@dataclasses.dataclass(frozen=True)
class Roofline:
  peak_flops: float        # achievable FLOP/s per chip (peak x mfu)
  bandwidth: float         # achievable bytes/s per chip (HBM x mbu)
  link: float              # bytes/s per chip per direction
  latency: float           # seconds per all-reduce
  overhead: float          # seconds of host work per step
  layers: int
  overlap: bool = True     # compute and memory time overlap (max) or add up (sum)
  node: int = 0            # chips per host (0: every chip in one host)
  inter_link: float = 0.0  # bytes/s per chip per direction between hosts
  inter_latency: float = 0.0   # seconds added to an all-reduce that crosses hosts

  @staticmethod
  def of(hw, layers: int) -> "Roofline":
    return Roofline(hw.peak_tflops * 1e12 * hw.mfu, hw.hbm_gbps * 1e9 * hw.mbu,
                    hw.link_gbps * 1e9, hw.collective_latency_us * 1e-6,
                    hw.step_overhead_ms * 1e-3, layers, hw.overlap, hw.devices // hw.hosts,
                    hw.internode_gbps * 1e9, hw.internode_latency_us * 1e-6)

  def allreduce_time(self, width: int, nbytes: float) -> float:
    """One all-reduce of `nbytes` over `width` chips: a ring inside a host; across hosts, a
    reduce-scatter inside each host, a ring between hosts over each chip's share, and an
    all-gather inside each host again (what NCCL and XLA do between nodes)."""
    if width <= 1:
      return 0.0
    inside = min(width, self.node) if self.node else width
    t = self.latency + 2.0 * (inside - 1) / inside * nbytes / self.link
    hosts = width // inside
    if hosts > 1:
      t += self.inter_latency + 2.0 * (hosts - 1) / hosts * nbytes / inside / self.inter_link
    return t

  def span_time(self, s: SpanWork) -> float:
    compute, memory = s.flops / self.peak_flops, s.bytes / self.bandwidth
    t = max(compute, memory) if self.overlap else compute + memory
    return t + 2 * self.layers * self.allreduce_time(s.width, s.allreduce_bytes)

  def step_time(self, spans: list[SpanWork]) -> float:
    return self.overhead + max(self.span_time(s) for s in spans)


FEATURES = ("step", "sequence", "flop", "byte", "allreduce", "allreduce_byte", "span_layer")


def features(spans: list[SpanWork], layers: int) -> np.ndarray:
  """The measured model's inputs for one step (all devices' work: they share the cores)."""
  f = np.zeros(len(FEATURES))
  f[0] = 1.0
  for s in spans:
    devices = s.width * s.groups
    f[1] += s.sequences
    f[2] += devices * s.flops
    f[3] += devices * s.bytes
    if s.width > 1:
      f[4] += 2 * layers * s.groups
      f[5] += 2 * layers * devices * s.allreduce_bytes
    f[6] += layers
  return f


@dataclasses.dataclass(frozen=True)
class Measured:
  coefficients: tuple[float, ...]   # seconds per unit of each of FEATURES
  layers: int

  def step_time(self, spans: list[SpanWork]) -> float:
    return float(np.dot(self.coefficients, features(spans, self.layers)))


def fit(rows: np.ndarray, seconds: np.ndarray) -> tuple[float, ...]:
  """Non-negative least squares on relative error (each step weighs the same)."""
  from scipy.optimize import nnls

  scale = rows.max(axis=0)
  scale[scale == 0] = 1.0
  a = rows / scale / seconds[:, None]
  coef, _ = nnls(a, np.ones(len(seconds)))
  return tuple(float(c) for c in coef / scale)


def make_model(hw, layers: int):
  if hw.fitted:
    if len(hw.fitted) != len(FEATURES):
      raise ValueError(f"hardware {hw.name}: fitted needs {len(FEATURES)} coefficients "
                       f"({', '.join(FEATURES)}); run flying-jax sim calibrate")
    return Measured(tuple(hw.fitted), layers)
  return Roofline.of(hw, layers)

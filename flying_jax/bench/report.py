"""The figures of a serving benchmark, from per-request timings (vLLM's benchmark's arithmetic).

Every request is a `RequestRecord` of client-side times (seconds from the start of the run). The
summary has vLLM's fields: completed and failed requests, duration, request and token throughput,
peak output tokens/s (over one-second windows), TTFT, TPOT (excluding the first token), ITL and
end-to-end latency as mean / median / p90 / p99 in milliseconds, and goodput: requests per second
that met every given SLO.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class RequestRecord:
  sent: float                                   # seconds from the start of the run
  input_tokens: int
  priority: int = 0
  token_times: list[float] = dataclasses.field(default_factory=list)   # one per output token
  done: float | None = None
  error: str | None = None
  warmup: bool = False

  @property
  def ok(self) -> bool:
    return self.error is None and self.done is not None

  @property
  def output_tokens(self) -> int:
    return len(self.token_times)

  @property
  def ttft(self) -> float | None:
    return self.token_times[0] - self.sent if self.token_times else None

  @property
  def tpot(self) -> float | None:
    """Mean time per output token after the first (None with fewer than two tokens)."""
    n = len(self.token_times)
    return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

  @property
  def itls(self) -> list[float]:
    return list(np.diff(self.token_times)) if len(self.token_times) > 1 else []

  @property
  def e2e(self) -> float | None:
    return self.done - self.sent if self.done is not None else None


@dataclasses.dataclass(frozen=True)
class SLO:
  """Per-request targets for goodput, in milliseconds (None: no target)."""
  ttft_ms: float | None = None
  tpot_ms: float | None = None
  e2e_ms: float | None = None

  def met(self, r: RequestRecord) -> bool:
    checks = [(self.ttft_ms, r.ttft), (self.tpot_ms, r.tpot), (self.e2e_ms, r.e2e)]
    return r.ok and all(t is None or (v is not None and 1e3 * v <= t) for t, v in checks)


def stats_ms(values) -> dict:
  """mean, median, p90, p99 (and std) of seconds, in milliseconds; NaN when empty."""
  v = 1e3 * np.asarray([x for x in values if x is not None], dtype=np.float64)
  if not v.size:
    return {k: math.nan for k in ("mean", "median", "p90", "p99", "std")}
  return {"mean": float(v.mean()), "median": float(np.median(v)),
          "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)),
          "std": float(v.std())}


def summarize(records: list[RequestRecord], slo: SLO = SLO()) -> dict:
  """The figures of the measured (non-warm-up) requests."""
  rs = [r for r in records if not r.warmup]
  ok = [r for r in rs if r.ok]
  if rs:
    start = min(r.sent for r in rs)
    end = max([r.done for r in ok] + [r.sent for r in rs])
  else:
    start = end = 0.0
  duration = max(end - start, 1e-9)
  out_tokens = sum(r.output_tokens for r in ok)
  in_tokens = sum(r.input_tokens for r in ok)
  times = np.asarray([t for r in ok for t in r.token_times])
  peak = 0
  if times.size:
    per_second = np.bincount(np.floor(times - start).astype(int).clip(min=0))
    peak = int(per_second.max())
  good = [r for r in ok if slo.met(r)]
  return {
      "completed": len(ok), "failed": len(rs) - len(ok), "duration_s": duration,
      "input_tokens": in_tokens, "output_tokens": out_tokens,
      "request_throughput": len(ok) / duration,
      "output_throughput": out_tokens / duration,
      "total_token_throughput": (in_tokens + out_tokens) / duration,
      "peak_output_throughput": float(peak),
      "ttft_ms": stats_ms(r.ttft for r in ok),
      "tpot_ms": stats_ms(r.tpot for r in ok),
      "itl_ms": stats_ms(x for r in ok for x in r.itls),
      "e2e_ms": stats_ms(r.e2e for r in ok),
      "goodput": len(good) / duration if any(dataclasses.astuple(slo)) else None,
      "slo": dataclasses.asdict(slo),
  }


def table(s: dict, title: str = "Serving Benchmark Result") -> str:
  """vLLM's benchmark table."""
  w = 50
  lines = [f"{' ' + title + ' ':=^{w}}"]
  for key, label, fmt in (("completed", "Successful requests:", ""),
                          ("failed", "Failed requests:", ""),
                          ("duration_s", "Benchmark duration (s):", ".2f"),
                          ("input_tokens", "Total input tokens:", ""),
                          ("output_tokens", "Total generated tokens:", ""),
                          ("request_throughput", "Request throughput (req/s):", ".2f"),
                          ("output_throughput", "Output token throughput (tok/s):", ".2f"),
                          ("peak_output_throughput", "Peak output token throughput (tok/s):",
                           ".2f"),
                          ("total_token_throughput", "Total token throughput (tok/s):", ".2f"),
                          ("goodput", "Request goodput (req/s):", ".2f")):
    if s.get(key) is not None:                 # the simulator has no peak; goodput needs SLOs
      lines.append(f"{label:<40}{s[key]:<10{fmt}}")
  for key, name in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token "
                    "(excl. 1st token)"), ("itl_ms", "Inter-token Latency"),
                    ("e2e_ms", "End-to-end Latency")):
    if s.get(key) is None:
      continue
    short = key.split("_")[0].upper()
    lines.append(f"{' ' + name + ' ':-^{w}}")
    for stat in ("mean", "median", "p90", "p99"):
      label = f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {short} (ms):"
      lines.append(f"{label:<40}{s[key][stat]:<10.2f}")
  lines.append("=" * w)
  return "\n".join(lines)

"""The benchmark's timeline as a PNG: offered load and queue depth, TTFT and TPOT over time, the
partition in force shaded and every switch marked."""

from __future__ import annotations

import numpy as np

from flying_jax.bench.load import LoadResult


def _partition_spans(timeline):
  """[(start, end, partition)] from the stats samples."""
  spans = []
  for s in timeline:
    if spans and spans[-1][2] == s.partition:
      spans[-1][1] = s.t
    else:
      if spans:
        spans[-1][1] = s.t
      spans.append([s.t, s.t, s.partition])
  return [tuple(x) for x in spans]


def timeline_png(result: LoadResult, path: str, title: str = "") -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  recs = [r for r in result.records if not r.warmup]
  end = max([r.done or r.sent for r in recs] + [s.t for s in result.timeline] + [1.0])
  fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
  spans = _partition_spans(result.timeline)
  names = sorted({p for _, _, p in spans})
  colors = dict(zip(names, plt.get_cmap("Pastel1").colors))
  for ax in axes:
    for a, b, p in spans:
      ax.axvspan(a, b, color=colors[p], alpha=0.6, lw=0)
    for a, _, _ in spans[1:]:
      ax.axvline(a, color="0.3", lw=0.8, ls="--")
  bins = np.arange(0.0, end + 1.0, 1.0)
  offered, _ = np.histogram([a.at for a in result.arrivals], bins=bins)
  ax = axes[0]
  ax.step(bins[:-1], offered, where="post", color="tab:blue", label="offered load (req/s)")
  if result.timeline:
    ax.plot([s.t for s in result.timeline], [s.waiting for s in result.timeline],
            color="tab:red", label="waiting")
    ax.plot([s.t for s in result.timeline], [s.running for s in result.timeline],
            color="tab:green", label="running")
  ax.set_ylabel("requests")
  ax.legend(loc="upper right", fontsize=8)
  ok = [r for r in recs if r.ok and r.ttft is not None]
  axes[1].scatter([r.sent for r in ok], [1e3 * r.ttft for r in ok], s=8,
                  c=["tab:orange" if r.priority else "tab:purple" for r in ok])
  axes[1].set_ylabel("TTFT (ms; orange: priority)")
  tp = [r for r in ok if r.tpot is not None]
  axes[2].scatter([r.sent for r in tp], [1e3 * r.tpot for r in tp], s=8, color="tab:brown")
  axes[2].set_ylabel("TPOT (ms)")
  axes[2].set_xlabel("seconds (dashed: a switch; shading: partition in force)")
  handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in names]
  if handles:
    axes[2].legend(handles, [f"partition {p}" for p in names], loc="upper right", fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path

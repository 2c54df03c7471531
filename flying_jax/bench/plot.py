"""The benchmark's timeline as a PNG: offered load and queue depth, TTFT and TPOT over time, the
partition in force shaded and every switch marked."""

from __future__ import annotations

import numpy as np

from flying_jax.bench.load import LoadResult


def _partition_spans(timeline):
  """[(start, end, partition)] from (t, waiting, running, partition) samples."""
  spans = []
  for t, _, _, part in timeline:
    if spans and spans[-1][2] == part:
      spans[-1][1] = t
    else:
      if spans:
        spans[-1][1] = t
      spans.append([t, t, part])
  return [tuple(x) for x in spans]


def timeline_png(result: LoadResult, path: str, title: str = "") -> str:
  recs = [r for r in result.records if not r.warmup and r.ok and r.ttft is not None]
  return timeline_plot([a.at for a in result.arrivals],
                       [(r.sent, r.ttft, r.tpot, r.priority) for r in recs],
                       [(s.t, s.waiting, s.running, s.partition) for s in result.timeline],
                       path, title)


def timeline_plot(arrivals, requests, timeline, path: str, title: str = "") -> str:
  """`arrivals`: arrival times; `requests`: (sent, ttft s, tpot s or None, priority) of each
  completed request; `timeline`: (t, waiting, running, partition) samples."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  end = max([r[0] + r[1] for r in requests] + [s[0] for s in timeline] + [1.0])
  fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
  spans = _partition_spans(timeline)
  names = sorted({p for _, _, p in spans})
  colors = dict(zip(names, plt.get_cmap("Pastel1").colors))
  for ax in axes:
    for a, b, p in spans:
      ax.axvspan(a, b, color=colors[p], alpha=0.6, lw=0)
    for a, _, _ in spans[1:]:
      ax.axvline(a, color="0.3", lw=0.8, ls="--")
  width = max(1.0, end / 300)
  bins = np.arange(0.0, end + width, width)
  offered, _ = np.histogram(arrivals, bins=bins)
  ax = axes[0]
  ax.step(bins[:-1], offered / width, where="post", color="tab:blue", label="offered load (req/s)")
  if timeline:
    ax.plot([s[0] for s in timeline], [s[1] for s in timeline], color="tab:red", label="waiting")
    ax.plot([s[0] for s in timeline], [s[2] for s in timeline], color="tab:green",
            label="running")
  ax.set_ylabel("requests")
  ax.legend(loc="upper right", fontsize=8)
  size = 8 if len(requests) < 2000 else 2
  axes[1].scatter([r[0] for r in requests], [1e3 * r[1] for r in requests], s=size,
                  c=["tab:orange" if r[3] else "tab:purple" for r in requests])
  axes[1].set_ylabel("TTFT (ms; orange: priority)")
  tp = [r for r in requests if r[2] is not None]
  axes[2].scatter([r[0] for r in tp], [1e3 * r[2] for r in tp], s=size, color="tab:brown")
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

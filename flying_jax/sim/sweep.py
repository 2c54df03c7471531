"""`flying-jax sim sweep`: static DP, static TP and `auto` over a range of Poisson rates, from
light load to beyond saturation, with and without priority traffic; the table users compare
(P90 TTFT and output throughput at each rate) and a plot of P90 TTFT against the rate.

`auto` is judged against the better static layout at each point: the one with the lower P90
TTFT (its throughput is the reference for auto's).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# (model, hardware) -> Poisson rates (req/s) from light to beyond what static DP sustains
PAIRS = {("llama-3-8b", "h100-sxm-8"): (10.0, 40.0, 80.0, 160.0, 320.0),
         ("llama-3-70b", "h200-8"): (1.0, 3.0, 6.0, 12.0, 24.0)}
INPUT_LEN, OUTPUT_LEN = "lognormal:1024:0.5", "lognormal:256:0.5"


@dataclasses.dataclass(frozen=True)
class Point:
  model: str
  hardware: str
  rate: float
  priority_share: float
  policy: str                 # "DP", "TP" or "auto"
  p90_ttft_s: float
  output_tok_s: float


def run_sweep(pairs: dict, requests: int = 1000, priority_shares=(0.0, 0.05), seed: int = 0,
              progress=None) -> list[Point]:
  from flying_jax.bench import traces
  from flying_jax.sim import hardware as H
  from flying_jax.sim.simulate import model_card, simulate

  points = []
  for (model, hw_name), rates in pairs.items():
    card, hw = model_card(model), H.load_hardware(hw_name)
    plan = H.plan(card, hw)
    policies = {"DP": f"static:{plan.dp_width}", "TP": f"static:{max(plan.widths)}",
                "auto": "auto"}
    for share in priority_shares:
      for rate in rates:
        arrivals = traces.synthetic(traces.poisson(rate, requests, seed), INPUT_LEN, OUTPUT_LEN,
                                    priority_share=share, seed=seed)
        for name, policy in policies.items():
          out = simulate(card, hw, arrivals, policy)
          ttft = out.first_token - out.arrival
          span = np.nanmax(out.finish) if np.isfinite(out.finish).any() else np.nan
          points.append(Point(model, hw_name, rate, share, name,
                              float(np.nanpercentile(ttft, 90)),
                              float(out.output_tokens.sum() / span)))
          if progress is not None:
            progress.update(1)
  return points


def _key(p: Point):
  return (p.model, p.hardware, p.priority_share, p.rate)


def verdicts(points: list[Point]) -> list[dict]:
  """Per (model, hardware, priority share, rate): each policy's figures and auto against the
  better static layout (lower P90 TTFT)."""
  rows: dict = {}
  for p in points:
    rows.setdefault(_key(p), {})[p.policy] = p
  out = []
  for key, by in rows.items():
    best = min(("DP", "TP"), key=lambda n: by[n].p90_ttft_s)
    auto = by["auto"]
    out.append(dict(model=key[0], hardware=key[1], priority_share=key[2], rate=key[3],
                    best=best, ttft_ratio=auto.p90_ttft_s / by[best].p90_ttft_s,
                    throughput_ratio=auto.output_tok_s / by[best].output_tok_s, **by))
  return out


def table(points: list[Point]) -> str:
  lines = ["| model on hardware | priority | rate (req/s) | P90 TTFT DP / TP / auto (ms) | "
           "output tok/s DP / TP / auto | auto vs better static: P90 TTFT, throughput |",
           "|---|---|---|---|---|---|"]
  for v in verdicts(points):
    dp, tp, auto = v["DP"], v["TP"], v["auto"]
    lines.append(
        f"| {v['model']} on {v['hardware']} | {100 * v['priority_share']:.0f}% | {v['rate']:g} | "
        f"{1e3 * dp.p90_ttft_s:.0f} / {1e3 * tp.p90_ttft_s:.0f} / {1e3 * auto.p90_ttft_s:.0f} | "
        f"{dp.output_tok_s:.0f} / {tp.output_tok_s:.0f} / {auto.output_tok_s:.0f} | "
        f"{v['ttft_ratio']:.2f}x of {v['best']}, {100 * v['throughput_ratio']:.0f}% |")
  return "\n".join(lines)


def plot(points: list[Point], path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = sorted({(p.model, p.hardware, p.priority_share) for p in points})
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
  for ax, (model, hw, share) in zip(axes[0], panels):
    for policy, style in (("DP", "s--"), ("TP", "^--"), ("auto", "o-")):
      pts = sorted((p.rate, p.p90_ttft_s) for p in points
                   if (p.model, p.hardware, p.priority_share, p.policy) == (model, hw, share,
                                                                            policy))
      ax.plot([r for r, _ in pts], [1e3 * t for _, t in pts], style, label=policy)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Poisson rate (req/s)")
    ax.set_ylabel("P90 TTFT (ms)")
    ax.set_title(f"{model} on {hw}" + (f", {100 * share:.0f}% priority" if share else ""),
                 fontsize=9)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path

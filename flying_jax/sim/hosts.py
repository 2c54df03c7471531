"""`flying-jax sim --scenario hosts`: when merging TP groups across hosts pays, and when not.

A model on several nodes (default Llama-3-70B on two nodes of 8 H100s, `h100-sxm-2x8`): every
width from the narrowest that holds the model to the whole machine, served statically, and
`auto`, at Poisson rates from light to heavy load. A group wider than a node splits each layer's
all-reduces between NVLink inside the nodes and the slower inter-node links
(`cost.Roofline.allreduce_time`), so its prefill is faster only while the halved matmuls outweigh
the crossing; at load, one merged group also has fewer decode slots and prefill rows than two
node-wide ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flying_jax.bench import traces
from flying_jax.sim import hardware as H
from flying_jax.sim.simulate import model_card, simulate


@dataclasses.dataclass(frozen=True)
class HostsScenario:
  model: str = "llama-3-70b"
  hardware: str = "h100-sxm-2x8"
  rates: tuple[float, ...] = (1.0, 8.0, 24.0)
  requests: int = 300
  input_len: str = "lognormal:1024:0.5"
  output_len: str = "lognormal:256:0.5"
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Row:
  rate: float
  policy: str
  p90_ttft_ms: float
  tpot_ms: float               # median
  output_tok_s: float
  seconds_per_partition: dict


def run_hosts(sc: HostsScenario = HostsScenario(), progress=None) -> tuple[list[Row], H.Plan]:
  card, hw = model_card(sc.model), H.load_hardware(sc.hardware)
  plan = H.plan(card, hw)
  policies = [f"static:{w}" for w in plan.widths] + ["auto"]
  rows = []
  for rate in sc.rates:
    arrivals = traces.synthetic(traces.poisson(rate, sc.requests, sc.seed), sc.input_len,
                                sc.output_len, seed=sc.seed)
    for policy in policies:
      out = simulate(card, hw, arrivals, policy)
      s = out.summary()
      ttft = out.first_token - out.arrival
      rows.append(Row(rate, policy, 1e3 * float(np.nanpercentile(ttft, 90)),
                      s["tpot_ms"]["median"], s["output_throughput"],
                      dict(out.seconds_per_partition)))
      if progress is not None:
        progress.update(1)
  return rows, plan


def table(rows: list[Row], plan: H.Plan, sc: HostsScenario) -> str:
  node = plan.preset.host_devices
  head = (f"Across hosts, simulated: {sc.model} on {sc.hardware} ({plan.preset.hosts} hosts x "
          f"{node} chips; widths above {node} merge TP groups across hosts), {sc.requests} "
          f"requests per rate, input {sc.input_len}, output {sc.output_len}")
  lines = [head, "", "| rate (req/s) | policy | P90 TTFT (ms) | median TPOT (ms) | output tok/s | "
                     "best static |", "|---|---|---|---|---|---|"]
  for rate in sorted({r.rate for r in rows}):
    at = [r for r in rows if r.rate == rate]
    static = [r for r in at if r.policy.startswith("static:")]
    best = min(static, key=lambda r: r.p90_ttft_ms)
    for r in at:
      width = r.policy.split(":")[1] if r.policy != "auto" else None
      where = ("" if width is None else " (across hosts)" if int(width) > node else "")
      mark = "yes" if r is best else ""
      lines.append(f"| {rate:g} | {r.policy}{where} | {r.p90_ttft_ms:.0f} | {r.tpot_ms:.1f} | "
                   f"{r.output_tok_s:.0f} | {mark} |")
  return "\n".join(lines)

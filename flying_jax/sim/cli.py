"""`flying-jax sim`: a workload through the real scheduler on simulated hardware.

  flying-jax sim                      one workload, one policy: vLLM's table
  flying-jax sim compare              the same workload under static DP, static TP and auto
  flying-jax sim sweep                static DP, static TP and auto from light load to beyond
                                      saturation, with and without priority traffic
  flying-jax sim --scenario paper     the paper's experiment beside the paper's numbers
  flying-jax sim calibrate            fit the local CPU's cost model to the real engine
  flying-jax sim validate             a trace on the real engine and on the simulator: the error
  flying-jax sim validate --hardware h200-8
                                      the preset's step times against those measured on it
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time

from flying_jax.bench import report, traces


def add_arguments(p):
  p.add_argument("mode", nargs="?", default="run",
                 choices=["run", "compare", "sweep", "calibrate", "validate"],
                 help="run (default): one policy; compare: static DP, static TP and auto; "
                      "sweep: static DP, static TP and auto at five Poisson rates, with and "
                      "without 5%% priority requests (Llama-3-8B on h100-sxm-8 and Llama-3-70B "
                      "on h200-8 unless --model/--hardware and --rates are given); "
                      "calibrate: measure the real engine here and fit the cpu preset; "
                      "validate: the same trace on the real engine and simulated, with the error "
                      "(with --hardware other than cpu: the preset's model against the step "
                      "times measured on that hardware, and the shares that fit them)")
  p.add_argument("--scenario", default=None, choices=["paper", "hosts"],
                 help="paper: Llama-3-70B on 8xH200 under bursts, priority and saturation, "
                      "static DP vs static TP vs auto, beside the paper's figures; hosts: "
                      "Llama-3-70B on two nodes of 8 H100s (h100-sxm-2x8, or --hardware), every "
                      "width served statically and auto at light to heavy load (--rates): when "
                      "merging TP groups across hosts pays")
  p.add_argument("--hardware", default=None,
                 help="hardware preset (meshes/hardware/*.toml): h100-sxm-8 (default), h200-8, "
                      "tpu-v5e-8, tpu-v6e-8, cpu (this machine, calibrated; default of "
                      "calibrate and validate)")
  p.add_argument("--model", default=None,
                 help="model card (models/*.toml); default llama-3-8b, smollm2-135m for "
                      "calibrate and validate")
  p.add_argument("--mesh", default=None, help="mesh preset to simulate (default: the hardware's)")
  p.add_argument("--max-context", type=int, default=None,
                 help="override the model card's context limit (e.g. 131072 for Llama-3.1)")
  p.add_argument("--policy", default="auto", help="static:W, static:4+1x4, load, priority, "
                                                 "memory or auto")
  traces.add_arguments(p, requests=None, rate=None, phases="60:0.5,60:16,60:0.5",
                       input_len=None, output_len=None)
  p.add_argument("--output", default=None,
                 help="calibrate: where to write the fitted preset (default: "
                      "meshes/hardware/cpu.toml)")
  p.add_argument("--stored", action="store_true",
                 help="validate: use the stored cpu preset instead of fitting it again first")
  p.add_argument("--json", default=None, help="write every figure and request timing here")
  p.add_argument("--plot", default=None, help="write the timeline PNG here")
  p.add_argument("--rates", default=None,
                 help="sweep: comma-separated Poisson rates (req/s) for --model on --hardware")
  p.add_argument("--no-progress", dest="progress", action="store_false")


def _bar(total: int, enabled: bool, desc: str):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="req", mininterval=0.5)


# (model, hardware, requests, rate, input lengths, output lengths) unless given
DEFAULTS = {"sim": ("llama-3-8b", "h100-sxm-8", 1000, 8.0, "lognormal:1024:0.5",
                    "lognormal:256:0.5"),
            "cpu": ("smollm2-135m", "cpu", 40, 1.5, "uniform:16:128", "uniform:16:64")}


def _defaults(args):
  cpu = args.mode in ("calibrate", "validate")
  values = DEFAULTS["cpu" if cpu else "sim"]
  for name, v in zip(("model", "hardware", "requests", "rate", "input_len", "output_len"),
                     values):
    if getattr(args, name) is None:
      setattr(args, name, v)
  if cpu and args.mesh is None:
    args.mesh = "cpu-8"


def run_sim(args) -> int:
  from flying_jax.config import ConfigError
  from flying_jax.sim.hardware import SimError

  _defaults(args)
  try:
    if args.scenario == "paper":
      return _paper(args)
    if args.scenario == "hosts":
      return _hosts(args)
    if args.mode == "sweep":
      return _sweep(args)
    if args.mode == "validate" and args.hardware != DEFAULTS["cpu"][1]:
      return _reference(args)
    if args.mode in ("calibrate", "validate"):
      from flying_jax.sim import calibrate
      return calibrate.run(args)
    return _run(args)
  except (SimError, ConfigError, ValueError) as e:
    print(f"error: {e}")
    return 2


def _run(args) -> int:
  from flying_jax.bench.serving import compare_table
  from flying_jax.sim import hardware as H
  from flying_jax.sim.simulate import model_card, simulate

  card = model_card(args.model, args.max_context)
  hw = H.load_hardware(args.hardware)
  plan = H.plan(card, hw, args.mesh)
  tokenizer = None
  if args.sharegpt:                       # ShareGPT lengths in the card's own tokens
    from flying_jax.tokenizers import load_tokenizer
    tokenizer = load_tokenizer(card)
  arrivals = traces.from_args(args, tokenizer)
  if args.mode == "compare":
    policies = {f"static DP{plan.dp_width}": f"static:{plan.dp_width}",
                f"static TP{max(plan.widths)}": f"static:{max(plan.widths)}", "auto": "auto"}
  else:
    policies = {args.policy: args.policy}
  print(f"sim: {len(arrivals)} requests, {args.trace or args.arrival} arrivals, {card.name} on "
        f"{hw.name} ({hw.description}); widths {plan.widths}, {plan.pages} KV pages per device "
        + (f"and {plan.local_pages} in the sliding layers' pools " if plan.local_pages else "")
        + f"(a width-{plan.dp_width} group holds {plan.pool_tokens(plan.dp_width)} tokens)",
        flush=True)
  if hw.fitted and f"{card.name} on" not in hw.calibrated:
    print(f"note: {hw.name} was calibrated on {hw.calibrated or 'another model'}; times for "
          f"{card.name} are extrapolated from it")
  runs, dump = {}, {}
  for name, policy in policies.items():
    t0 = time.perf_counter()
    bar = _bar(len(arrivals), args.progress, name)
    out = simulate(card, hw, arrivals, policy, args.mesh, progress=bar)
    if bar is not None:
      bar.close()
    wall = time.perf_counter() - t0
    summary = out.summary()
    runs[name] = (out, summary)
    dump[name] = out.to_json()
    busy = sum(out.seconds_per_partition.values()) or 1.0
    print(report.table(summary, f"{name} (simulated)"))
    if out.rejected:
      print(f"{out.rejected} requests refused: prompt + output tokens longer than the model's "
            f"context ({card.arch.max_context}; --max-context) or than any group holds")
    print("busy time per partition: " + ", ".join(
        f"{k} {100 * v / busy:.0f}%" for k, v in sorted(out.seconds_per_partition.items())) +
        f"; {len(out.switches)} switches; simulated in {wall:.1f} s", flush=True)
    if args.plot:
      path = args.plot if len(policies) == 1 else args.plot.replace(
          ".png", f"-{policy.replace(':', '')}.png")
      out.plot(path, f"{card.name} on {hw.name} (simulated): {name}")
      print(f"timeline: {path}")
  if len(runs) > 1:
    print(compare_table(runs))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"model": card.name, "hardware": hw.name, "machine": platform.platform(),
                 "date": time.strftime("%Y-%m-%d"), "runs": dump}, f)
  return 0


def _reference(args) -> int:
  """`sim validate --hardware NAME`: the preset's model against the step times measured on it."""
  from flying_jax.sim import hardware as H
  from flying_jax.sim import reference
  from flying_jax.sim.simulate import model_card

  hw = H.load_hardware(args.hardware)
  pts = reference.points(hw)
  if not pts:
    raise ValueError(f"hardware {hw.name} has no measured step times ([[measured]] in its "
                     f"preset); validate the local CPU with --hardware cpu")
  cards = {p.model: model_card(p.model) for p in pts}
  text, errors = reference.table(hw, cards)
  print(text)
  worst = max(abs(e) for e in errors) if errors else 0.0
  print(f"fitted points: worst error {100 * worst:.0f}% (target within "
        f"{100 * reference.TOLERANCE:.0f}%)")
  best = reference.fit_shares(hw, cards, pts)
  if best:
    print("shares that fit them best (mbu kept): " +
          ", ".join(f"{k} = {v}" for k, v in best.items()))
  return 0 if worst <= reference.TOLERANCE else 1


def _paper(args) -> int:
  from flying_jax.sim import scenario

  sc = scenario.PaperScenario(seed=args.seed)
  bar = _bar(10, args.progress, "paper scenario runs")
  result = scenario.run_paper(sc, progress=bar)
  if bar is not None:
    bar.close()
  print(scenario.table(result))
  if args.plot:
    scenario.plot(result, args.plot)
    print(f"plot: {args.plot}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": result.rows, "runs": {k: v.to_json() for k, v in result.bursty.items()}},
                f)
  return 0


def _hosts(args) -> int:
  from flying_jax.sim import hosts

  sc = hosts.HostsScenario(seed=args.seed)
  if args.hardware != DEFAULTS["sim"][1]:
    sc = dataclasses.replace(sc, hardware=args.hardware)
  if args.model != DEFAULTS["sim"][0]:
    sc = dataclasses.replace(sc, model=args.model)
  if args.rates:
    sc = dataclasses.replace(sc, rates=tuple(float(r) for r in args.rates.split(",")))
  if args.requests != DEFAULTS["sim"][2]:
    sc = dataclasses.replace(sc, requests=args.requests)
  plan_widths = len(hosts.H.plan(hosts.model_card(sc.model), hosts.H.load_hardware(sc.hardware))
                    .widths)
  bar = _bar(len(sc.rates) * (plan_widths + 1), args.progress, "hosts scenario runs")
  rows, plan = hosts.run_hosts(sc, bar)
  if bar is not None:
    bar.close()
  print(hosts.table(rows, plan, sc))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": [dataclasses.asdict(r) for r in rows]}, f)
  return 0


def _sweep(args) -> int:
  from flying_jax.sim import sweep

  pairs = dict(sweep.PAIRS)
  if args.rates or args.model != DEFAULTS["sim"][0] or args.hardware != DEFAULTS["sim"][1]:
    if not args.rates:
      raise ValueError("sweep with --model or --hardware needs --rates, e.g. --rates 1,4,16")
    pairs = {(args.model, args.hardware): tuple(float(r) for r in args.rates.split(","))}
  shares = (0.0, args.priority_share or 0.05)
  total = sum(len(r) for r in pairs.values()) * len(shares) * 3
  bar = _bar(total, args.progress, "sweep runs")
  points = sweep.run_sweep(pairs, args.requests, shares, args.seed, bar)
  if bar is not None:
    bar.close()
  print(sweep.table(points))
  if args.plot:
    print(f"plot: {sweep.plot(points, args.plot)}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                 "points": [dataclasses.asdict(p) for p in points]}, f)
  return 0

"""The local CPU's cost model: measured on the real engine, checked against it.

`calibrate` runs short bursts of requests through the real engine (cpu-8 mesh) in every partition,
records each step's work (the simulator's own `span_work` of the step the executor ran) and its
wall time, fits the measured model's coefficients (non-negative least squares on relative error)
and writes them into a hardware preset (`meshes/hardware/cpu.toml`).

`validate` fits the coefficients again on the same engine (or, with `--stored`, reads the preset),
then replays one trace on the real engine (wall clock) and on the simulator with the same policy,
and prints the prediction error of mean TTFT and throughput (the target: within 25%).
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from flying_jax.bench import traces
from flying_jax import presets
from flying_jax.sim import hardware as H
from flying_jax.sim.cost import FEATURES, ModelCosts, features, fit
from flying_jax.sim.driver import drive
from flying_jax.sim.runtime import step_work

POLICIES = ("static:1", "static:2", "static:4", "static:8", "static:4+1x4", "static:2+2+4", "auto")
TOLERANCE = 0.25


def record_steps(engine, costs: ModelCosts):
  """Wrap `engine` so each step's features and wall time are appended to the returned lists."""
  rows, seconds, last = [], [], []
  launch, step = engine.executor.launch, engine.step
  layers = engine.card.arch.n_layers
  overlap, engine.overlap = engine.overlap, False      # a step's time is its own

  def launch_recorded(spans, work, banned_for, prev=None):
    last.extend(w for w, _, _ in step_work(costs, spans, work))
    return launch(spans, work, banned_for, prev)

  def step_recorded():
    # every span's step launched in this call, all collected: one lockstep step of the
    # partition (on the shared CPU cores, spans running at once slow each other down)
    last.clear()
    t0 = time.perf_counter()
    events = step()
    engine.sync()                    # its events come with the next call
    dt = time.perf_counter() - t0
    if last:
      rows.append(features(last, layers))
      seconds.append(dt)
    return events

  def restore():
    del engine.executor.launch, engine.step       # back to the class's methods
    engine.overlap = overlap

  engine.executor.launch, engine.step = launch_recorded, step_recorded
  return rows, seconds, restore


def _real_engine(args):
  from flying_jax.offline import LLM

  llm = LLM(model=args.model, mesh=args.mesh or "cpu-8", widths="all", progress=args.progress)
  return llm.engine


def _costs(engine) -> ModelCosts:
  return ModelCosts.of(engine.card.arch, H.dtype_bytes(engine.preset))


def calibration_workload(seed: int) -> list[traces.Arrival]:
  """A burst, then requests one by one: prefill and decode steps of many sizes."""
  rng = np.random.default_rng(seed)
  burst = traces.synthetic(np.zeros(10), "uniform:16:200", "uniform:8:40", seed=seed)
  spaced = traces.synthetic(np.cumsum(rng.uniform(0.3, 0.8, size=4)) + 1.0, "uniform:100:300",
                            "uniform:8:24", seed=seed + 1)
  return sorted(burst + spaced, key=lambda a: a.at)


def fit_engine(engine, seed: int, log=print) -> tuple[tuple[float, ...], np.ndarray, np.ndarray]:
  """Run the calibration bursts in every partition; (coefficients, features, seconds)."""
  rows, seconds, restore = record_steps(engine, _costs(engine))
  try:
    for k, policy in enumerate(POLICIES):
      engine.set_policy(policy)
      drive(engine, calibration_workload(seed + k))
      log(f"calibrate: {policy}: {len(seconds)} steps so far")
  finally:
    restore()
  a, t = np.asarray(rows), np.asarray(seconds)
  return fit(a, t), a, t


def _stamp(engine, steps: int) -> str:
  return (f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{engine.card.name} on {engine.preset.name}, {steps} steps")


def calibrate(args) -> int:
  engine = _real_engine(args)
  coef, a, t = fit_engine(engine, args.seed, lambda m: print(m, flush=True))
  err = np.abs(a @ np.asarray(coef) - t) / t
  path = args.output or str(presets.writable_folder("hardware") / "cpu.toml")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(_preset_text(engine.preset, coef, _stamp(engine, len(t))))
  print(f"fitted {len(t)} steps: median step {1e3 * np.median(t):.1f} ms, relative error median "
        f"{100 * np.median(err):.1f}%, p90 {100 * np.percentile(err, 90):.1f}%")
  for name, c in zip(FEATURES, coef):
    print(f"  {name:<16} {c:.4g}")
  print(f"wrote {path}")
  return 0


def _preset_text(preset, coef, stamp: str) -> str:
  return (f'# This machine\'s CPU, simulated devices of the mesh preset sharing its cores.\n'
          f'# Written by `flying-jax sim calibrate`: seconds per unit of each step feature\n'
          f'# ({", ".join(FEATURES)}).\n'
          f'name = "cpu"\ndescription = "the local CPU ({preset.name}, calibrated)"\n'
          f'mesh = "{preset.name}"\ndevices = {preset.devices}\nshared_cores = true\n'
          f'switch_ms = 0.2\n'
          f'fitted = [{", ".join(f"{c:.6g}" for c in coef)}]\n'
          f'calibrated = "{stamp}"\n')


def validation_workload(args) -> list[traces.Arrival]:
  return traces.from_args(args)


def validate(args) -> int:
  from flying_jax.sim.simulate import simulated_engine, without_gc

  arrivals = validation_workload(args)
  engine = _real_engine(args)
  if args.stored:
    hw = H.load_hardware(args.hardware)
    if not hw.fitted:
      raise ValueError(f"validate compares the real engine on this machine with a calibrated "
                       f"preset; {hw.name} is not one (use --hardware cpu)")
  else:                   # fitted now, on the same engine: the machine's speed drifts over hours
    coef, _, t = fit_engine(engine, args.seed, lambda m: print(m, flush=True))
    hw = H.Hardware(name="cpu", mesh=engine.preset.name, devices=engine.preset.devices,
                    shared_cores=True, fitted=coef, calibrated="fitted just now: " +
                    _stamp(engine, len(t)))
  real = {}
  policies = [args.policy] if args.mode == "validate" and args.policy else ["auto"]
  for policy in policies:
    engine.set_policy(policy)
    real[policy] = drive(engine, arrivals)
  print(f"validate: {len(arrivals)} requests ({args.arrival}, input {args.input_len}, output "
        f"{args.output_len}) on {engine.card.name} / {engine.preset.name}, real engine vs "
        f"simulator ({hw.name}: {hw.calibrated})")
  worst = 0.0
  for policy in policies:
    sim_engine, clock, _ = simulated_engine(engine.card, hw, policy, engine.preset.name)
    with without_gc():
      sim = drive(sim_engine, arrivals, clock.wait_until)
    rows = _compare(real[policy].summary(), sim.summary())
    print(f"\npolicy {policy}: {len(real[policy].switches)} switches real, "
          f"{len(sim.switches)} simulated")
    print(f"| {'metric':<26} | {'real':>10} | {'simulated':>10} | {'error':>7} |")
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 12}|{'-' * 9}|")
    for name, r, s, gated in rows:
      e = (s - r) / r if r else float("nan")
      if gated:
        worst = max(worst, abs(e))
      print(f"| {name:<26} | {r:>10.1f} | {s:>10.1f} | {100 * e:>+6.1f}% |")
  ok = worst <= TOLERANCE
  print(f"\nlargest error on mean TTFT and throughput: {100 * worst:.1f}% "
        f"({'within' if ok else 'OVER'} the {100 * TOLERANCE:.0f}% target)")
  return 0 if ok else 1


def _compare(real: dict, sim: dict):
  return [("mean TTFT (ms)", real["ttft_ms"]["mean"], sim["ttft_ms"]["mean"], True),
          ("P90 TTFT (ms)", real["ttft_ms"]["p90"], sim["ttft_ms"]["p90"], False),
          ("median TPOT (ms)", real["tpot_ms"]["median"], sim["tpot_ms"]["median"], False),
          ("mean E2E (ms)", real["e2e_ms"]["mean"], sim["e2e_ms"]["mean"], False),
          ("output throughput (tok/s)", real["output_throughput"], sim["output_throughput"], True)]


def run(args) -> int:
  return calibrate(args) if args.mode == "calibrate" else validate(args)

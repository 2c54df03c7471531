"""The simulator: the engine's own scheduler on simulated hardware.

Deterministic for a seed, conserves requests and pages, makes the scheduling decisions the real
engine makes, and its cost model and memory plan follow the hardware's figures.
"""

import dataclasses
import json

import numpy as np
import pytest

from flying_jax.bench import traces
from flying_jax.config import ConfigError, load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.sampling import SamplingParams
from flying_jax.sim import hardware as H
from flying_jax.sim import scenario
from flying_jax.sim.cost import FEATURES, Measured, ModelCosts, Roofline, fit, span_work
from flying_jax.sim.driver import drive
from flying_jax.sim.simulate import model_card, simulate, simulated_engine

H100 = H.load_hardware("h100-sxm-8")


def bursty(n_quiet=0.5, n_burst=12.0, seconds=20.0, seed=0):
  phases = [(seconds, n_quiet), (seconds, n_burst), (seconds, n_quiet)]
  return traces.synthetic(traces.phased(phases, seed), "lognormal:1024:0.5", "lognormal:128:0.5",
                          priority_share=0.05, seed=seed)


def test_deterministic_for_a_seed_and_different_across_seeds():
  card = model_card("llama-3-8b")
  a, b = (simulate(card, H100, bursty(seed=1), "auto") for _ in range(2))
  np.testing.assert_array_equal(a.first_token, b.first_token)
  np.testing.assert_array_equal(a.finish, b.finish)
  assert [(r.reason, r.to_width) for r in a.switches] == [(r.reason, r.to_width)
                                                          for r in b.switches]
  c = simulate(card, H100, bursty(seed=2), "auto")
  assert c.arrival.size != a.arrival.size or not np.array_equal(c.first_token, a.first_token)


@pytest.mark.parametrize("policy", ["static:1", "static:8", "static:4+1x4", "auto"])
def test_every_request_finishes_with_its_tokens_and_no_page_leaks(policy):
  card = model_card("llama-3-8b")
  arrivals = bursty(seed=3)
  engine, clock, _ = simulated_engine(card, H100, policy)
  out = drive(engine, arrivals, clock.wait_until)
  assert out.rejected == 0 and np.isfinite(out.finish).all()
  np.testing.assert_array_equal(out.output_tokens, [a.output_tokens for a in arrivals])
  assert (out.first_token >= out.arrival).all() and (out.finish >= out.first_token).all()
  assert engine.no_leaks() and not engine.paused.all()
  assert sum(out.seconds_per_partition.values()) <= out.finish.max() + 1e-9


def test_policy_changes_simulated_outcomes_as_it_changes_real_ones():
  """All requests at t=0 under a static policy: scheduling does not depend on time, so the real
  engine and the simulated one must run the same steps, and a policy change must change them the
  same way."""
  card = load_model_card("tiny")
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,),
                               prefill_chunks=(32,), token_budget=40)
  # one step at a time, as the simulator steps (with overlap a step's events come a call later)
  config = EngineConfig(widths=(1, 8), width=1, pages_per_device=8, overlap=False)
  rng = np.random.default_rng(0)
  work = [(rng.integers(0, 512, size=int(n)).tolist(), int(m))
          for n, m in zip(rng.integers(5, 60, 12), rng.integers(2, 20, 12))]
  real = Engine(card, preset, config)

  def steps(engine, policy):
    engine.set_policy(policy)
    engine.step()                                   # the static policy's switch, if any
    for i, (prompt, m) in enumerate(work):
      engine.add_request(f"{policy}-{i}", prompt,
                         SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
    trace = []
    while engine.has_unfinished():
      trace.append(sorted((ev.seq.request_id.split("-")[1], len(ev.seq.output_ids))
                          for ev in engine.step()))
    assert engine.no_leaks()
    for i in range(len(work)):
      engine.release(f"{policy}-{i}")
    return trace

  sim, _, _ = simulated_engine(card, H100, mesh=preset, config=config)
  traces_ = {}
  for policy in ("static:1", "static:8"):
    traces_[policy] = steps(sim, policy)
    assert steps(real, policy) == traces_[policy], policy
  assert traces_["static:1"] != traces_["static:8"]
  assert len(traces_["static:1"]) != len(traces_["static:8"])


def test_roofline_decode_step_is_weights_over_bandwidth():
  card = model_card("llama-3-8b")
  costs = ModelCosts.of(card.arch, 2)
  model = Roofline.of(H100, card.arch.n_layers)
  engine, _, _ = simulated_engine(card, H100)
  ws = engine.setups[1]
  shape = next(s for s in ws.shapes if s.decode == 1 and not s.chunk)
  one = span_work(costs, ws, [_Work([])], shape)
  a = card.arch
  weights = (a.param_count() - a.vocab_size * a.dim) * 2     # every weight but the embedding table
  expected = weights / (H100.hbm_gbps * 1e9 * H100.mbu)
  assert one.bytes == pytest.approx(weights, rel=0.05)
  assert model.span_time(one) == pytest.approx(expected, rel=0.05)
  tp8 = span_work(costs, engine.setups[8], [_Work([])], shape)
  collectives = 2 * a.n_layers * H100.collective_latency_us * 1e-6   # two tiny all-reduces a layer
  assert model.span_time(tp8) == pytest.approx(model.span_time(one) / 8 + collectives, rel=0.05)


@dataclasses.dataclass
class _Work:
  decode: list
  prefills: list = dataclasses.field(default_factory=list)

  @property
  def prefill_tokens(self):
    return 0


def test_plan_sizes_the_model_on_the_hardware():
  p = H.plan(model_card("llama-3-70b"), H.load_hardware("h200-8"))
  assert p.widths == (2, 4, 8) and p.dp_width == 2          # 141 GB of weights: TP2 replicas
  assert p.base_width == 2 and p.preset.base_width == 2     # ... each chip holds half of them
  split = 80 * (2 * 64 + 2 * 8) * 128 * 8192 * 2 + 80 * 3 * 28672 * 8192 * 2
  split += 2 * 128256 * 8192 * 2                            # embedding and output tables too
  assert p.device_weight_bytes == p.weight_bytes - split // 2
  assert 70e9 < p.device_weight_bytes < 71e9                # norms on both chips
  assert p.pool_tokens(8) == 4 * p.pool_tokens(2)
  assert "2+2+4" in p.preset.partitions and "4+1x4" not in p.preset.partitions
  assert H.plan(model_card("llama-3-70b"), H.load_hardware("h200-8"), "gpu-8-tp2") == \
      dataclasses.replace(p, preset=dataclasses.replace(
          p.preset, name="gpu-8-tp2", partitions=("4+2x2", "2x2+4")))
  with pytest.raises(H.SimError, match="does not fit"):
    H.plan(model_card("llama-3-70b"), H.load_hardware("tpu-v5e-8"))
  small = H.plan(model_card("llama-3-8b"), H100)
  assert small.widths == (1, 2, 4, 8) and small.pages > p.pages


def test_fit_recovers_known_coefficients():
  rng = np.random.default_rng(0)
  rows = np.column_stack([np.ones(200)] + [rng.uniform(0, 10 ** k, 200) for k in range(1, 7)])
  true = np.array([1e-3, 2e-5, 0.0, 3e-10, 0.0, 1e-9, 4e-8])
  coef = fit(rows, rows @ true)
  np.testing.assert_allclose(coef, true, rtol=1e-6, atol=1e-15)
  assert len(coef) == len(FEATURES)
  assert Measured(tuple(coef), 2).step_time([]) == pytest.approx(1e-3)


def test_paper_scenario_table(tmp_path):
  sc = scenario.PaperScenario(phase_s=20.0, saturated_requests=300, priority_requests=200,
                              low_requests=30)
  result = scenario.run_paper(sc)
  rows = {r[0].split(",")[0].split(" (")[0]: r[1] for r in result.rows}
  assert len(result.rows) == 9
  gain = {k: float(v.split("x")[0]) for k, v in rows.items() if "TTFT" in k}
  assert gain["P90 TTFT under bursts"] > 1.0     # auto leaves TP for DP when the burst comes
  assert gain["P90 TTFT at low load"] > 2.0      # ... and serves a quiet engine from TP8
  assert "4.0x" in result.rows[6][1] and "llama-3-70b" in result.rows[6][0]  # TP2 -> TP8
  assert "8.0x" in result.rows[7][1] and "llama-3-8b" in result.rows[7][0]   # one chip -> 8
  text = scenario.table(result)
  assert "4.79x" in text and "| P90 TTFT at low load" in text
  path = scenario.plot(result, str(tmp_path / "paper.png"))
  assert open(path, "rb").read(4) == b"\x89PNG"


def test_sim_cli_compare_json_plot_and_errors(tmp_path, capsys):
  from flying_jax import cli

  rc = cli.main(["sim", "compare", "--requests", "150", "--rate", "30", "--no-progress",
                 "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "t.png")])
  out = capsys.readouterr().out
  assert rc == 0
  assert "static DP1 (simulated)" in out and "static TP8 (simulated)" in out
  assert "auto vs DP" in out and "P90 TTFT (ms)" in out
  runs = json.load(open(tmp_path / "s.json"))["runs"]
  assert set(runs) == {"static DP1", "static TP8", "auto"}
  for run in runs.values():
    assert run["summary"]["completed"] == 150 and len(run["requests"]["arrival"]) == 150
  assert open(tmp_path / "t-auto.png", "rb").read(4) == b"\x89PNG"
  rc = cli.main(["sim", "--model", "llama-3-70b", "--hardware", "tpu-v5e-8", "--no-progress"])
  assert rc == 2 and "does not fit" in capsys.readouterr().out
  rc = cli.main(["sim", "--hardware", "abacus", "--no-progress"])
  assert rc == 2 and "unknown hardware 'abacus'" in capsys.readouterr().out


def test_the_preset_calibrate_writes_loads_back(tmp_path):
  from flying_jax.sim.calibrate import _preset_text

  coef = (0.05, 0.006, 4.7e-12, 6.4e-11, 0.0014, 1.6e-9, 0.0)
  path = tmp_path / "cpu.toml"
  path.write_text(_preset_text(load_mesh_preset("cpu-8"), coef, "today, tiny on cpu-8, 9 steps"))
  hw = H.load_hardware(str(path))
  assert hw.fitted == pytest.approx(coef) and hw.shared_cores and hw.devices == 8
  assert H.plan(model_card("tiny"), hw).widths == (1, 2, 4, 8)
  shipped = H.load_hardware("cpu")                      # the preset in the repository
  assert len(shipped.fitted) == len(FEATURES) and "on cpu-8" in shipped.calibrated


def test_the_plan_allocates_what_the_engine_allocates():
  """A card sized by the simulator on a machine where one chip cannot hold the weights and KV,
  then built for real on that plan (base width 2 on the CPU mesh): the same weight bytes per
  engine and per device, the same KV bytes per device."""
  card = load_model_card("smollm2-135m")
  card = dataclasses.replace(card, arch=dataclasses.replace(card.arch, n_layers=2, vocab_size=512),
                             weights=dataclasses.replace(card.weights, format="random"))
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,), prefill_chunks=(32,),
                               token_budget=40, partitions=())
  one_chip = H.weights_on(card, preset)[1]
  two_chips = H.weights_on(card, dataclasses.replace(preset, base_width=2, widths=(2, 4, 8)))[1]
  page = H.plan(card, H.Hardware("x", "cpu-8", 8, peak_tflops=1, hbm_gbps=1), preset).page_bytes
  assert one_chip - two_chips > 16 * page               # base width 1 leaves no room for 16 pages
  hw = H.Hardware("x", "cpu-8", 8, peak_tflops=1, hbm_gbps=1, memory_utilization=1.0,
                  hbm_gb=(two_chips + 16.5 * page) / 1e9)
  plan = H.plan(card, hw, preset)
  assert (plan.base_width, plan.widths, plan.pages) == (2, (2, 4, 8), 16)
  engine = Engine(card, plan.preset, EngineConfig(widths=plan.widths, cache_dir=""))
  rep = engine.report
  assert (rep.weight_bytes, rep.device_weight_bytes) == (plan.weight_bytes,
                                                         plan.device_weight_bytes)
  assert rep.kv_bytes == plan.preset.devices * plan.pages * plan.page_bytes


def test_each_span_keeps_its_own_clock():
  """Llama-3-70B on 8xH200 in 2x2+4: a long prompt prefills in the TP4 span while the TP2
  replicas decode. Their decode steps follow one another at their own pace (several per prefill
  chunk); in lockstep they would get one token per chunk."""
  card = model_card("llama-3-70b")
  engine, clock, _ = simulated_engine(card, H.load_hardware("h200-8"), "static:2+2+4")
  engine.step()                                       # the static policy's switch
  assert engine.partition.name == "2x2+4"
  rng = np.random.default_rng(0)
  short = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
  for i in range(2):
    engine.add_request(f"dp-{i}", rng.integers(0, 1000, size=64).tolist(), short)
  engine.add_request("long", rng.integers(0, 1000, size=8000).tolist(),
                     SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), priority=1)
  launches = []
  launch = engine.executor.launch

  def logged(spans, work, banned_for, prev=None):
    launches.append((spans[0].span.width, clock()))
    return launch(spans, work, banned_for, prev)

  engine.executor.launch = logged
  dp_tokens, long_first = [], None
  while engine.has_unfinished():
    for ev in engine.step():
      if ev.seq.request_id == "long" and long_first is None:
        long_first = clock()
      elif ev.seq.request_id.startswith("dp") and ev.new_ids:
        dp_tokens.append(clock())
  del engine.executor.launch
  assert engine.no_leaks()
  prefill_steps = sum(w == 4 and t < long_first for w, t in launches)
  assert prefill_steps >= 3                           # the prompt came in several chunks
  during = sum(t < long_first for t in dp_tokens) / 2   # tokens per DP sequence meanwhile
  assert during >= 2 * prefill_steps, (during, prefill_steps)


def test_sim_sweep_cli_table_json_plot(tmp_path, capsys):
  from flying_jax import cli
  from flying_jax.sim import sweep

  rc = cli.main(["sim", "sweep", "--model", "llama-3-8b", "--hardware", "h100-sxm-8",
                 "--rates", "10,320", "--requests", "60", "--no-progress",
                 "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
  out = capsys.readouterr().out
  assert rc == 0
  rows = [line for line in out.splitlines() if line.startswith("| llama-3-8b on h100-sxm-8")]
  assert len(rows) == 4 and {r.split("|")[2].strip() for r in rows} == {"0%", "5%"}
  points = [sweep.Point(**p) for p in json.load(open(tmp_path / "s.json"))["points"]]
  assert len(points) == 2 * 2 * 3 and {p.rate for p in points} == {10.0, 320.0}
  for v in sweep.verdicts(points):                 # auto judged against the lower static TTFT
    best = v[v["best"]]
    assert best.p90_ttft_s == min(v["DP"].p90_ttft_s, v["TP"].p90_ttft_s)
    assert v["ttft_ratio"] == pytest.approx(v["auto"].p90_ttft_s / best.p90_ttft_s)
  heavy = {p.policy: p for p in points if p.rate == 320.0 and p.priority_share == 0.0}
  assert heavy["TP"].p90_ttft_s > heavy["DP"].p90_ttft_s    # beyond TP8's capacity
  assert open(tmp_path / "s.png", "rb").read(4) == b"\x89PNG"
  assert cli.main(["sim", "sweep", "--model", "llama-3-70b", "--no-progress"]) == 2
  assert "needs --rates" in capsys.readouterr().out


def test_gpu_preset_predicts_the_step_times_measured_on_an_h200(capsys):
  """h200-8's shares were set from the steps measured on one H200: its prediction of each
  fitted point is within the tolerance, and `sim validate --hardware` says so."""
  from flying_jax import cli
  from flying_jax.sim import reference

  hw = H.load_hardware("h200-8")
  pts = reference.points(hw)
  assert len([p for p in pts if p.fit]) >= 4 and not hw.overlap
  cards = {p.model: model_card(p.model) for p in pts}
  _, errors = reference.table(hw, cards)
  assert max(abs(e) for e in errors) <= reference.TOLERANCE
  assert cli.main(["sim", "validate", "--hardware", "h200-8"]) == 0
  out = capsys.readouterr().out
  assert "| llama-3-8b | decode b64 | 28 | 11.00 |" in out and "worst error" in out
  assert cli.main(["sim", "validate", "--hardware", "tpu-v5e-8"]) == 2   # nothing measured


def test_fit_shares_recovers_the_shares_that_made_the_points():
  from flying_jax.sim import reference

  card = model_card("llama-3-8b")
  truth = dataclasses.replace(H.load_hardware("h200-8"), mfu=0.45, step_overhead_ms=2.5)
  shapes = [dict(batch=b, context=c) for b, c in ((1, 10), (16, 200), (64, 50), (256, 30))]
  shapes.append(dict(chunk=1024, context=512))
  pts = [reference.Point("llama-3-8b", 0.0, **s) for s in shapes]
  pts = [dataclasses.replace(p, ms=reference.predict(truth, card, p)) for p in pts]
  guess = dataclasses.replace(truth, mfu=0.7, step_overhead_ms=0.0)
  best = reference.fit_shares(guess, {"llama-3-8b": card}, pts)
  assert best["mfu"] == pytest.approx(0.45, rel=1e-2)
  assert best["step_overhead_ms"] == pytest.approx(2.5, abs=0.02)
  # compute and memory overlapped: their max is not linear in the shares, nothing is fitted
  assert reference.fit_shares(dataclasses.replace(guess, overlap=True),
                              {"llama-3-8b": card}, pts) == {}
  # added, a step costs both: a b256 decode's compute is no longer hidden under its weights
  work = reference.work_of(card, pts[3], 2)
  added = Roofline.of(truth, card.arch.n_layers)
  compute = work.flops / added.peak_flops
  memory = work.bytes / added.bandwidth
  assert added.span_time(work) == pytest.approx(compute + memory)
  assert dataclasses.replace(added, overlap=True).span_time(work) == pytest.approx(
      max(compute, memory))


def test_all_reduces_that_cross_hosts_cost_the_inter_node_link():
  one = Roofline.of(H.load_hardware("h100-sxm-8"), 80)
  two = Roofline.of(H.load_hardware("h100-sxm-2x8"), 80)
  mb = 16e6
  assert two.allreduce_time(8, mb) == pytest.approx(one.allreduce_time(8, mb))  # inside a node
  # width 16: a ring over the node's 8 GPUs, then the two nodes exchange each GPU's eighth
  inside = one.allreduce_time(8, mb)
  assert two.allreduce_time(16, mb) == pytest.approx(inside + 25e-6 + 2 * 0.5 * mb / 8 / 50e9)
  with pytest.raises(ConfigError, match="several hosts need internode_gbps"):
    dataclasses.replace(H.load_hardware("h100-sxm-2x8"), internode_gbps=0.0)
  with pytest.raises(H.SimError, match="spreads its chips over 2 host"):
    H.plan(model_card("llama-3-8b"), H.load_hardware("h100-sxm-2x8"),
           dataclasses.replace(load_mesh_preset("gpu-2x8"), hosts=1))


def test_hosts_scenario_merges_across_hosts_when_it_pays():
  from flying_jax.sim import hosts

  sc = hosts.HostsScenario(rates=(1.0, 24.0), requests=150)
  rows, plan = hosts.run_hosts(sc)
  p90 = {(r.rate, r.policy): r.p90_ttft_ms for r in rows}
  assert plan.preset.hosts == 2 and max(plan.widths) == 16
  assert p90[1.0, "static:16"] < p90[1.0, "static:8"]      # light load: the merged group's prefill
  assert p90[24.0, "static:8"] < p90[24.0, "static:16"]    # heavy: two node-wide groups
  text = hosts.table(rows, plan, sc)
  assert "static:16 (across hosts)" in text and "| 24 | static:8 |" in text

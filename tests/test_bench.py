"""The serving benchmark's arithmetic on hand-made timings, and the workload generators' statistics."""

import json
import math

import numpy as np
import pytest

from flying_jax.bench import report, traces
from flying_jax.bench.report import SLO, RequestRecord


def hand_made():
  # sent, token times, done; one failed and one warm-up request that must not count
  return [
      RequestRecord(0.0, 10, token_times=[0.1, 0.2, 0.3], done=0.3),        # ttft 100, tpot 100
      RequestRecord(0.5, 20, token_times=[0.8, 1.0], done=1.0),             # ttft 300, tpot 200
      RequestRecord(1.0, 30, token_times=[1.2, 1.25, 1.3, 1.35, 1.4], done=1.4),  # 200, 50
      RequestRecord(1.5, 40, token_times=[2.0], done=2.0),                  # ttft 500, no tpot
      RequestRecord(1.6, 50, error="UNAVAILABLE: gone"),
      RequestRecord(0.0, 99, token_times=[9.0], done=9.0, warmup=True),
  ]


def test_summary_matches_hand_computed_figures():
  s = report.summarize(hand_made())
  assert (s["completed"], s["failed"]) == (4, 1)
  assert s["duration_s"] == pytest.approx(2.0)                            # 0.0 .. 2.0
  assert s["input_tokens"] == 100 and s["output_tokens"] == 11
  assert s["request_throughput"] == pytest.approx(2.0)
  assert s["output_throughput"] == pytest.approx(5.5)
  assert s["total_token_throughput"] == pytest.approx(55.5)
  assert s["peak_output_throughput"] == 6                                 # 6 tokens in [1, 2)
  ttft = s["ttft_ms"]
  assert ttft["mean"] == pytest.approx(275.0) and ttft["median"] == pytest.approx(250.0)
  assert ttft["p90"] == pytest.approx(np.percentile([100, 300, 200, 500], 90))
  assert ttft["p99"] == pytest.approx(494.0)
  tpot = s["tpot_ms"]                                                     # 100, 200, 50
  assert tpot["mean"] == pytest.approx(350 / 3) and tpot["median"] == pytest.approx(100.0)
  itl = s["itl_ms"]                                                       # 100,100,200,50,50,50,50
  assert itl["mean"] == pytest.approx(600 / 7) and itl["median"] == pytest.approx(50.0)
  assert s["e2e_ms"]["mean"] == pytest.approx((300 + 500 + 400 + 500) / 4)
  assert s["goodput"] is None


def test_goodput_counts_requests_meeting_every_slo():
  recs = hand_made()
  assert report.summarize(recs, SLO(ttft_ms=250))["goodput"] == pytest.approx(1.0)   # 2 of 4
  assert report.summarize(recs, SLO(ttft_ms=250, tpot_ms=80))["goodput"] == pytest.approx(0.5)
  # a request with one token has no TPOT: it cannot meet a TPOT target
  assert report.summarize(recs, SLO(tpot_ms=1000))["goodput"] == pytest.approx(1.5)
  assert report.summarize(recs, SLO(e2e_ms=450))["goodput"] == pytest.approx(1.0)


def test_table_has_vllm_rows():
  text = report.table(report.summarize(hand_made(), SLO(ttft_ms=250)))
  for row in ("Successful requests:", "Failed requests:", "Benchmark duration (s):",
              "Request throughput (req/s):", "Output token throughput (tok/s):",
              "Peak output token throughput (tok/s):", "Request goodput (req/s):",
              "Mean TTFT (ms):", "Median TTFT (ms):", "P90 TTFT (ms):", "P99 TTFT (ms):",
              "Mean TPOT (ms):", "P99 ITL (ms):", "Median E2E (ms):"):
    assert row in text, row
  assert "275.00" in text


def test_empty_runs_do_not_divide_by_zero():
  s = report.summarize([RequestRecord(0.0, 5, error="x")])
  assert s["completed"] == 0 and s["failed"] == 1 and math.isnan(s["ttft_ms"]["mean"])


# ---------------------------------------------------------------- workloads
def test_poisson_and_gamma_rates_and_burstiness():
  t = traces.poisson(4.0, 20000, seed=0)
  assert t[0] == 0 and np.all(np.diff(t) >= 0)
  assert len(t) / t[-1] == pytest.approx(4.0, rel=0.03)
  gaps = np.diff(t)
  assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)        # exponential: CV 1
  for shape in (0.25, 4.0):
    g = np.diff(traces.gamma(4.0, shape, 20000, seed=1))
    assert 1 / g.mean() == pytest.approx(4.0, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(shape), rel=0.1)
  assert np.array_equal(traces.gamma(3.0, 0.5, 100, seed=7), traces.gamma(3.0, 0.5, 100, seed=7))
  with pytest.raises(ValueError):
    traces.gamma(0.0, 1.0, 10)


def test_phased_and_diurnal_follow_their_rates():
  t = traces.phased([(100, 1.0), (50, 20.0), (100, 1.0)], seed=0)
  low1, burst, low2 = ((t >= a) & (t < b) for a, b in ((0, 100), (100, 150), (150, 250)))
  assert low1.sum() == pytest.approx(100, rel=0.25) and low2.sum() == pytest.approx(100, rel=0.25)
  assert burst.sum() == pytest.approx(1000, rel=0.1)
  assert traces.parse_phases("20:0.5,10:8") == [(20.0, 0.5), (10.0, 8.0)]
  for bad in ("20", "a:b", "0:1"):
    with pytest.raises(ValueError):
      traces.parse_phases(bad)
  d = traces.diurnal(1.0, 20.0, period=100.0, duration=1000.0, seed=0)
  phase = d % 100.0
  trough = ((phase < 10) | (phase >= 90)).sum() / 200.0                 # rate near the low
  peak = ((phase >= 40) & (phase < 60)).sum() / 200.0                   # rate near the high
  assert trough < 4 and peak > 15


def test_lengths_synthetic_and_replay(tmp_path):
  rng = np.random.default_rng(0)
  assert set(traces.lengths("fixed:7", 5, rng)) == {7}
  u = traces.lengths("uniform:3:5", 1000, rng)
  assert set(u) == {3, 4, 5}
  ln = traces.lengths("lognormal:100:0.5", 20000, rng)
  assert ln.mean() == pytest.approx(100, rel=0.05) and ln.min() >= 1
  for bad in ("fixed", "uniform:1", "normal:1:2", "fixed:x"):
    with pytest.raises(ValueError):
      traces.lengths(bad, 3, rng)
  arr = traces.synthetic(traces.poisson(2.0, 200, 0), "fixed:16", "uniform:4:8",
                         priority_share=0.25, seed=0)
  assert all(a.input_tokens == 16 and 4 <= a.output_tokens <= 8 for a in arr)
  assert 0.15 < np.mean([a.priority for a in arr]) < 0.35
  path = tmp_path / "trace.jsonl"
  traces.save(arr, path)
  assert traces.replay(path) == arr
  (tmp_path / "bad.jsonl").write_text('{"at": 1}\n')
  with pytest.raises(ValueError, match="input_tokens"):
    traces.replay(tmp_path / "bad.jsonl")


def test_sharegpt_prompts_and_reply_lengths(tmp_path):
  class Words:
    def encode(self, text):
      return text.split()

  data = [{"conversations": [{"from": "human", "value": "one two three"},
                             {"from": "gpt", "value": "a b c d e"}]},
          {"conversations": [{"from": "human", "value": "only a question"}]},
          {"conversations": [{"from": "human", "value": "x y"}, {"from": "gpt", "value": "z"}]}]
  path = tmp_path / "sharegpt.json"
  path.write_text(json.dumps(data))
  arr = traces.sharegpt(path, np.arange(4.0), Words(), max_output=4, seed=0)
  assert len(arr) == 4 and [a.at for a in arr] == [0.0, 1.0, 2.0, 3.0]
  pairs = {(a.prompt, a.input_tokens, a.output_tokens) for a in arr}
  assert pairs <= {("one two three", 3, 4), ("x y", 2, 1)}             # reply capped at 4
  path.write_text("[]")
  with pytest.raises(ValueError, match="no conversation"):
    traces.sharegpt(path, np.arange(2.0), Words())

"""`flying-jax bench-offline` on the tiny model: every asked batch has a pure decode step timed
(or "-" above the biggest decode bucket), shares of the step are fractions, and --json holds it."""

import json

from flying_jax.cli import main


def test_bench_offline_batches_and_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  rc = main(["bench-offline", "--model", "tiny", "--mesh", "cpu-1", "--single-mesh", "none",
             "--prompts", "4", "--output-tokens", "4", "--batches", "1,2,4096",
             "--no-startup", "--json", str(out)])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "blocked in dispatch" in printed and "b4096 -" in printed
  result = json.loads(out.read_text())
  (run,) = result["runs"]
  assert "startup_cold_s" not in run
  (row,) = run["widths"].values()
  assert row["throughput"]["output_tok_s"] > 0
  for b in (1, 2):
    d = row[f"decode_b{b}"]
    assert d["steps"] >= 1 and d["step_ms"] > 0
    assert 0 <= d["dispatch_share"] <= 1 and 0 <= d["host_share"] <= 1
  assert row["decode_b4096"]["step_ms"] is None

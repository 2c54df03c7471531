"""The `flying-jax` command line: help, list, errors, one real generate run and convert -> orbax card."""

import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from flying_jax import cli
from flying_jax.config import available, load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.sampling import SamplingParams
from flying_jax.presets.from_hf import toml_value
from test_smollm2 import write_preset


@pytest.fixture(scope="module")
def small_mesh(tmp_path_factory):
  """small_mesh(name): a preset file, the shipped one with one decode bucket and one prefill chunk:
  fewer programs to compile, and on cpu-8 the other tiny-model tests' (the compilation cache
  shares them)."""
  folder = tmp_path_factory.mktemp("mesh")

  def write(name: str) -> str:
    path = folder / f"{name}-small.toml"
    if not path.exists():
      write_preset(path, dataclasses.replace(load_mesh_preset(name), name=f"{name}-small",
                                             decode_buckets=(8,), prefill_chunks=(32,),
                                             token_budget=40))
    return str(path)

  return write


def main(capsys, *argv):
  """Run the CLI in-process; (exit code, stdout, stderr)."""
  try:
    rc = cli.main(list(argv))
  except SystemExit as e:                                   # argparse: --help, usage errors
    rc = e.code
  out = capsys.readouterr()
  return rc, out.out, out.err


def test_console_script_is_declared():
  (ep,) = importlib.metadata.entry_points(group="console_scripts", name="flying-jax")
  assert ep.value == "flying_jax.cli:main" and ep.load() is cli.main


def test_help_mentions_the_commands_and_flags(capsys):
  rc, out, _ = main(capsys, "--help")
  assert rc == 0 and "flying-jax" in out
  for command in ("generate", "convert", "bench-offline", "list"):
    assert command in out
  rc, out, _ = main(capsys, "generate", "--help")
  assert rc == 0
  for flag in ("--model", "--mesh", "--width", "--all-widths", "--compile-cache", "--temperature",
               "--top-p", "--top-k", "--min-p", "--seed", "--max-tokens", "--min-tokens",
               "--repetition-penalty", "--stop", "--chat", "PROMPT"):
    assert flag in out, flag
  rc, out, _ = main(capsys, "convert", "--help")
  assert rc == 0 and "--output" in out and "--dtype" in out


def test_list(capsys):
  rc, out, _ = main(capsys, "list")
  assert rc == 0
  sections, title = {}, None
  for line in out.splitlines():
    if not line.startswith("  "):
      title = line.rstrip(":")
      sections[title] = []
    else:
      name, origin, path = line.split(maxsplit=2)
      assert path.endswith(f"{name}.toml") and origin in ("cwd", "checkout")
      sections[title].append(name)
  assert sections["models"] == available("models") and "tiny" in sections["models"]
  assert sections["meshes"] == available("meshes") and "cpu-8" in sections["meshes"]
  assert "h200-8" in sections["hardware (flying-jax sim)"]


def test_usage_errors_exit_2(capsys):
  rc, _, err = main(capsys, "generate")                    # no prompt
  assert rc == 2 and "PROMPT" in err
  rc, _, err = main(capsys, "no-such-command")
  assert rc == 2 and "invalid choice" in err


def test_generate_unknown_model_is_a_clear_error(capsys):
  rc, out, err = main(capsys, "generate", "--model", "no-such-model", "hi")
  assert rc == 2 and out == ""
  assert "error:" in err and "no-such-model" in err and "tiny" in err   # lists the known cards


def test_generate_bad_sampling_flag_is_a_clear_error(capsys):
  rc, _, err = main(capsys, "generate", "--model", "tiny", "--top-p", "0", "hi")
  assert rc == 2 and "top_p" in err


def test_generate_runs(tmp_path, small_mesh):
  """A real run in a fresh process (its compile cache goes under tmp_path, the working directory)."""
  env = dict(os.environ)
  proc = subprocess.run(
      [sys.executable, "-m", "flying_jax.cli", "generate", "--model", "tiny", "--mesh",
       small_mesh("cpu-1"), "--max-tokens", "4", "hi"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.endswith("\n") and proc.stdout.count("\n") >= 1
  assert "Traceback" not in proc.stderr


def _toml(tables: dict) -> str:
  lines = []
  for name, table in tables.items():
    if isinstance(table, dict):
      lines.append(f"[{name}]")
      lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None]
    else:
      lines.insert(0, f"{name} = {toml_value(table)}")
  return "\n".join(lines) + "\n"


def _greedy(engine, prompts, max_tokens=10):
  for i, p in enumerate(prompts):
    engine.add_request(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=max_tokens))
  while engine.has_unfinished():
    engine.step()
  out = [engine.request(f"g{i}")[0].output_ids for i in range(len(prompts))]
  assert engine.no_leaks()
  return out


def test_convert_then_orbax_card_generates_the_same(capsys, tmp_path, small_mesh):
  ckpt = tmp_path / "x"
  rc, out, err = main(capsys, "convert", "--model", "tiny", "--output", str(ckpt))
  assert rc == 0, err
  assert str(ckpt) in out and (ckpt / "flying_jax.json").exists()
  with pytest.raises(FileExistsError):
    cli.main(["convert", "--model", "tiny", "--output", str(ckpt)])

  tiny = load_model_card("tiny")
  card_path = tmp_path / "tiny-orbax.toml"
  card_path.write_text(_toml({
      "name": "tiny-orbax", "description": "tiny, converted to orbax",
      "architecture": dataclasses.asdict(tiny.arch),
      "weights": {"format": "orbax", "path": str(ckpt)},
      "tokenizer": dataclasses.asdict(tiny.tokenizer)}))
  card = load_model_card(str(card_path))
  assert card.arch == tiny.arch and card.weights.format == "orbax"
  rc, _, err = main(capsys, "convert", "--model", str(card_path), "--output", str(tmp_path / "y"))
  assert rc == 2 and "already points at an orbax checkpoint" in err

  preset = load_mesh_preset(small_mesh("cpu-1"))      # test_generate_runs' programs (cache)
  restored = Engine(card, preset, EngineConfig())
  original = Engine(tiny, preset, EngineConfig())
  for a, b in zip(jax.tree.leaves(restored.weights), jax.tree.leaves(original.weights)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  prompts = [[1, 2, 3], list(range(40, 90)), [7]]
  assert _greedy(restored, prompts) == _greedy(original, prompts)


def test_bench_switch_runs_and_moves_no_weight(tmp_path, capsys, small_mesh):
  out = tmp_path / "switch.json"
  assert cli.main(["bench-switch", "--model", "tiny", "--mesh", small_mesh("cpu-8"),
                   "--switches", "2", "--requests", "4", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert set(result["strategies"]) == {"pause", "recompute", "migrate", "drain"}
  assert result["strategies"]["migrate"]["weight_bytes_moved"] == 0
  assert result["migrate_s"]["256"] > 0
  assert all(r["weight_bytes_moved"] == 0 for r in result["strategies"].values())
  assert result["strategies"]["recompute"]["kv_tokens_recomputed_per_switch"] > 0
  assert result["recompute_s"]["256"] > 0
  assert "cutover host" in capsys.readouterr().out


def test_generate_on_a_mixed_partition_and_refusals(capsys, small_mesh):
  mesh = small_mesh("cpu-8")
  assert cli.main(["generate", "--model", "tiny", "--mesh", mesh, "--partition", "4+1x4",
                   "--max-tokens", "3", "hi", "there"]) == 0
  assert capsys.readouterr().out.count("--- prompt") == 2
  for bad, match in [("4+2+1+1", "does not allow partition 4+2+1x2"),
                     ("4+1x3", "cover 7 devices")]:
    assert cli.main(["generate", "--model", "tiny", "--mesh", mesh, "--partition", bad,
                     "hi"]) == 2
    assert match in capsys.readouterr().err


def test_bench_serve_reports_each_level(tmp_path, capsys, small_mesh):
  out = tmp_path / "serve.json"
  assert cli.main(["bench-serve", "--model", "tiny", "--mesh", small_mesh("cpu-8"),
                   "--width", "1", "--concurrency", "1,4", "--requests", "4",
                   "--output-tokens", "4", "--input-tokens", "8", "--json", str(out)]) == 0
  levels = json.loads(out.read_text())["levels"]
  assert [lv["concurrency"] for lv in levels] == [1, 4]
  for lv in levels:
    assert lv["requests"] == 4 and lv["output_tokens_per_s"] > 0
    assert 0 < lv["ttft_ms_p50"] <= lv["ttft_ms_p99"] and lv["tpot_ms_p50"] > 0
  assert "TTFT p50/p90/p99 ms" in capsys.readouterr().out


def test_bench_peer_agrees_with_transformers(capsys, small_mesh):
  """The same GGUF weights through transformers (PyTorch CPU) and flying-jax, greedy: the tokens
  agree and both rates are reported with their ratio."""
  rc, out, _ = main(capsys, "bench", "peer", "--mesh", small_mesh("cpu-1"),
                    "--batch-sizes", "1,2", "--input-tokens", "12", "--output-tokens", "6")
  assert rc == 0, out
  rows = [l for l in out.splitlines() if l.startswith("| 1 |") or l.startswith("| 2 |")]
  assert len(rows) == 2
  for row in rows:
    _, batch, theirs, ours, ratio, same, _ = [c.strip() for c in row.split("|")]
    assert float(theirs) > 0 and float(ours) > 0
    # the rates are printed to 0.1 tok/s and the ratio to 0.01: it lies within what the
    # rounded rates allow (on a busy machine rates of a few tok/s make that more than 2%)
    lo = (float(ours) - 0.05) / (float(theirs) + 0.05) - 0.005
    hi = (float(ours) + 0.05) / (float(theirs) - 0.05) + 0.005
    assert lo <= float(ratio.rstrip("x")) <= hi, (ratio, ours, theirs)
    assert int(same.rstrip("%")) >= 80                 # same weights, same greedy tokens
  assert "transformers" in out and "PyTorch" in out


def test_card_from_a_hugging_face_directory(capsys, tmp_path):
  """`card --from-hf`: a card whose architecture and weights are the directory's."""
  import numpy as np

  from flying_jax import checkpoints as ck

  tiny = load_model_card("tiny")
  weights = ck.random_weights(tiny.arch, seed=3)
  hf = ck.save_safetensors_dir(weights, tiny.arch, tmp_path / "Tiny-HF", shard_bytes=200_000)
  (hf / "generation_config.json").write_text('{"eos_token_id": [7, 9]}')
  out = tmp_path / "cards" / "tiny-hf.toml"
  rc, _, err = main(capsys, "card", "--from-hf", str(hf), "--output", str(out))
  assert rc == 0 and "wrote" in err
  card = load_model_card(str(out))
  assert card.name == "tiny-hf" and card.arch == tiny.arch
  assert card.weights.format == "safetensors" and card.tokenizer.kind == "bytes"
  assert card.tokenizer.stop_ids == (7, 9)
  loaded = ck.load_checkpoint(card)
  assert all(np.array_equal(loaded[k], weights[k]) for k in weights)
  rc, _, err = main(capsys, "card", "--from-hf", str(tmp_path / "nowhere"))
  assert rc == 2 and "config.json" in err

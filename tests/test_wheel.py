"""The wheel works outside the checkout: it carries every model card and mesh preset, and an
installed `flying-jax` lists and serves them from any folder."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                              ".cache", ".pytest_cache", "notebooks")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """`pip wheel --no-deps .` of a copy of the checkout (the checkout itself stays clean)."""
  src, out = tmp_path_factory.mktemp("src") / "flying-jax", tmp_path_factory.mktemp("wheel")
  shutil.copytree(ROOT, src, ignore=SKIP)
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                         str(src)], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "license" not in proc.stderr.lower(), proc.stderr      # no packaging warnings about it
  (built,) = out.glob("flying_jax-*.whl")
  return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> pathlib.Path:
  target = tmp_path_factory.mktemp("site")
  proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                         str(target), str(wheel)], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  return target


def test_every_card_and_preset_is_in_the_wheel(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  shipped = [p.relative_to(ROOT) for d in ("models", "meshes") for p in (ROOT / d).rglob("*")
             if p.is_file()]
  assert shipped and all(p.suffix == ".toml" for p in shipped)
  missing = [str(p) for p in shipped if f"flying_jax/presets/{p.as_posix()}" not in names]
  assert not missing, missing
  assert "flying_jax/serving/proto/flying_jax_pb2.py" in names       # the stubs the server runs
  assert not any(n.startswith(("models/", "meshes/", "tests/")) for n in names)


def run(installed, tmp_path, *args, env=None):
  """The installed console script, from a folder with no checkout, on the wheel's package."""
  environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC")}
  environ.update(PYTHONPATH=str(installed), **(env or {}))
  script = installed / "bin" / "flying-jax"
  return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=environ,
                        capture_output=True, text=True, timeout=600)


def test_installed_wheel_lists_and_generates_from_any_folder(installed, tmp_path):
  where = run(installed, tmp_path, "list")
  assert where.returncode == 0, where.stderr
  lines = {line.split()[0]: line for line in where.stdout.splitlines() if line.startswith("  ")}
  for name in ("smollm2-135m", "tiny", "cpu-8", "gpu-8", "h200-8"):
    assert "shipped" in lines[name] and str(installed) in lines[name], lines.get(name)
  probe = subprocess.run([sys.executable, "-c", "import flying_jax; print(flying_jax.__file__)"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)},
                         capture_output=True, text=True)
  assert probe.stdout.startswith(str(installed)), probe.stdout     # not the checkout's package
  gen = run(installed, tmp_path, "generate", "--model", "tiny", "--mesh", "cpu-1",
            "--max-tokens", "4", "--compile-cache", "", "hello", "world")
  assert gen.returncode == 0, gen.stderr
  assert "--- prompt 0" in gen.stdout and "--- prompt 1" in gen.stdout


def test_a_user_folder_comes_before_the_shipped_cards(installed, tmp_path):
  cards = tmp_path / "cards"
  cards.mkdir()
  text = (ROOT / "models" / "tiny.toml").read_text().replace('name = "tiny"', 'name = "mine"')
  (cards / "mine.toml").write_text(text)
  (cards / "tiny.toml").write_text(text.replace("n_layers = 2", "n_layers = 1"))
  out = run(installed, tmp_path, "--models-dir", str(cards), "list")
  assert out.returncode == 0, out.stderr
  lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ")}
  assert "$FLYING_JAX_MODELS_DIR" in lines["mine"] and str(cards) in lines["tiny"]
  assert "shipped" in lines["smollm2-135m"]
  env = run(installed, tmp_path, "list", env={"FLYING_JAX_MODELS_DIR": str(cards)})
  assert "mine" in env.stdout
  missing = run(installed, tmp_path, "generate", "--model", "nope", "hi")
  assert missing.returncode != 0 and "unknown model 'nope'" in missing.stderr
  assert "smollm2-135m" in missing.stderr

"""Where model cards, mesh presets and hardware presets come from.

A name is looked up, first hit wins, in:
  1. the user's folders: `--models-dir` / `--meshes-dir` on the command line, which set
     $FLYING_JAX_MODELS_DIR / $FLYING_JAX_MESHES_DIR (several folders joined by the path
     separator; hardware presets live in a mesh folder's `hardware/`);
  2. the current directory's `models/`, `meshes/` and `meshes/hardware/`;
  3. a checkout's top-level `models/` and `meshes/` when the package runs from one (the files a
     user edits there are the ones the wheel ships);
  4. the copies shipped inside the installed package (`flying_jax/presets/models/...`).
A path ending in `.toml` is read as it is. `entries()` lists what each name resolves to and where
it came from (`flying-jax list`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from pathlib import Path

# kind -> (the folder under a root, the environment variable of the user's folders, its subfolder)
KINDS = {
    "models": (("models",), "FLYING_JAX_MODELS_DIR", ()),
    "meshes": (("meshes",), "FLYING_JAX_MESHES_DIR", ()),
    "hardware": (("meshes", "hardware"), "FLYING_JAX_MESHES_DIR", ("hardware",)),
}
_CHECKOUT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  path: object          # a pathlib.Path, or an importlib.resources Traversable (shipped files)
  origin: str           # "file", "$FLYING_JAX_MODELS_DIR", "cwd", "checkout", "shipped"

  def read_text(self) -> str:
    return self.path.read_text(encoding="utf-8")

  @property
  def where(self) -> str:
    return str(self.path)


def in_checkout() -> bool:
  """Whether the package runs from a source checkout (not from an installed wheel)."""
  return (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "models").is_dir()


def roots(kind: str) -> list[tuple[str, object]]:
  """The folders searched for `kind`, in order, as (origin, folder)."""
  sub, env, user_sub = KINDS[kind]
  found: list[tuple[str, object]] = []
  for folder in filter(None, os.environ.get(env, "").split(os.pathsep)):
    found.append((f"${env}", Path(folder).expanduser().joinpath(*user_sub)))
  found.append(("cwd", Path.cwd().joinpath(*sub)))
  if in_checkout():
    found.append(("checkout", _CHECKOUT.joinpath(*sub)))
  shipped = importlib.resources.files("flying_jax.presets").joinpath(*sub)
  if shipped.is_dir():
    found.append(("shipped", shipped))
  out, seen = [], set()
  for origin, folder in found:            # the working directory may be the checkout
    key = str(Path(str(folder)).resolve()) if isinstance(folder, Path) else str(folder)
    if key not in seen:
      seen.add(key)
      out.append((origin, folder))
  return out


def find(kind: str, name: str) -> Source | None:
  """The file `name` (a bare name or a `.toml` path) resolves to, or None."""
  if name.endswith(".toml"):
    path = Path(name).expanduser()
    return Source(path.stem, path, "file") if path.is_file() else None
  for origin, folder in roots(kind):
    candidate = folder.joinpath(f"{name}.toml")
    if candidate.is_file():
      return Source(name, candidate, origin)
  return None


def entries(kind: str) -> list[Source]:
  """Every name of `kind` there is, each as the file it resolves to (the first root wins)."""
  out: dict[str, Source] = {}
  for origin, folder in roots(kind):
    if not folder.is_dir():
      continue
    for item in folder.iterdir():
      stem = item.name[:-len(".toml")] if item.name.endswith(".toml") else None
      if stem and item.is_file() and stem not in out:
        out[stem] = Source(stem, item, origin)
  return [out[k] for k in sorted(out)]


def writable_folder(kind: str) -> Path:
  """Where a command that writes a preset (`sim calibrate`) puts it by default: the user's
  folder if one is set, else the checkout's, else the current directory's."""
  sub, env, user_sub = KINDS[kind]
  users = [f for f in os.environ.get(env, "").split(os.pathsep) if f]
  if users:
    return Path(users[0]).expanduser().joinpath(*user_sub)
  return (_CHECKOUT if in_checkout() else Path.cwd()).joinpath(*sub)

"""Orbax checkpoints of the resident weight layout: convert once, restore straight onto devices.

`save_resident` writes the per-layer arrays that programs read, in resident layout, by canonical
tensor name (the weight table's); `restore_resident` restores them with a target tree of
`ShapeDtypeStruct`s that carry the engine's shardings, so orbax places every array directly where
the engine keeps it (no host copy of the whole model first), then puts them at their module paths.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flying_jax.config import Architecture, ConfigError, load_model_card
from flying_jax.model import tables
from flying_jax.model import weights as W

_META = "flying_jax.json"


def _tree(host: dict) -> dict:
  """The saved tree: every checkpoint tensor; per-layer constants are derived again on restore."""
  keep = lambda lw: {k: v for k, v in lw.items() if v is not None and k not in W.CONSTANTS}
  tree = {"embed": host["embed"], "final_norm": host["final_norm"],
          "layers": {str(i): keep(lw) for i, lw in enumerate(host["layers"])}}
  if host.get("lm_head") is not None:
    tree["unembed"] = host["lm_head"]
  return tree


def save_resident(host: dict, arch: Architecture, path: str | Path, model_name: str = ""):
  """Write host arrays in resident layout (see `weights.resident_layout`) as an orbax checkpoint."""
  import orbax.checkpoint as ocp

  path = Path(path).absolute()
  if path.exists():
    raise FileExistsError(f"{path} already exists; choose a new directory")
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path / "weights", _tree(host))
  ckpt.wait_until_finished()
  meta = {"model": model_name, "architecture": dataclasses.asdict(arch),
          "dtype": str(np.asarray(host["embed"]).dtype),
          "rows": [int(host["layers"][0]["wq"].shape[0]) // arch.head_dim,
                   int(host["layers"][0]["wk"].shape[0]) // arch.head_dim]}
  (path / _META).write_text(json.dumps(meta, indent=1))


def read_meta(path: str | Path) -> dict:
  meta_file = Path(path) / _META
  if not meta_file.exists():
    raise ConfigError(f"{path} is not a flying-jax orbax checkpoint (no {_META})")
  return json.loads(meta_file.read_text())


def restore_resident(path: str | Path, arch: Architecture, dtype, specs, rows=None
                     ) -> W.ResidentWeights:
  """Restore onto the devices, straight into the engine's shardings (`specs`: a width's
  `MeshSpecs`). `rows`: the `heads.RowBlocks` the compiled widths need; the checkpoint must hold
  as many rows. A checkpoint stores the one-device layout, which an engine of several devices
  reads directly when its shards are consecutive runs of it (heads that split evenly)."""
  import orbax.checkpoint as ocp

  from flying_jax.model.heads import RowBlocks

  path = Path(path).absolute()
  meta = read_meta(path)
  defaults = {f.name: f.default for f in dataclasses.fields(arch)}   # fields added since
  if {**defaults, **meta["architecture"]} != dataclasses.asdict(arch):
    raise ConfigError(f"checkpoint {path} was written for another architecture: "
                      f"{meta['architecture']}")
  stored = tuple(meta.get("rows") or (arch.n_heads, arch.n_kv_heads))
  rows = rows or RowBlocks.single(stored)
  if rows.base == 1:
    if any(have < need for have, need in zip(stored, rows.rows)):
      raise ConfigError(f"checkpoint {path} is laid out for fewer widths ({stored[0]} query / "
                        f"{stored[1]} KV rows, these widths need {rows.rows[0]} / "
                        f"{rows.rows[1]}): convert it again with a larger --max-width")
    rows = RowBlocks.single(stored)
  else:
    t = rows.base
    runs = (rows.q_lo == tuple(j * rows.q_size for j in range(t))
            and rows.kv_lo == tuple(j * rows.kv_size for j in range(t)))
    if not runs or stored != (t * rows.q_size, t * rows.kv_size):
      raise ConfigError(f"checkpoint {path} ({stored[0]} query / {stored[1]} KV rows) cannot be "
                        f"cut into shards of an engine of {t} devices for these widths (it "
                        f"needs {rows}); serve it at base width 1, or read the model's GGUF or "
                        f"safetensors")
  abstract = W.abstract(arch, meta["dtype"], specs, rows)
  parts = {"embed": abstract.embed, "final_norm": abstract.final_norm,
           "lm_head": abstract.lm_head}
  top = {s.name: W.at(parts, s.path) for s in tables.top_specs(arch)}
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype,
                                                    sharding=_one_layer(a.sharding)),
                     abstract.layers)          # the store keeps each layer's tensors apart
  layers = [{s.name: W.at(one, s.path) for s in tables.layer_specs(arch)}
            for _ in range(arch.n_layers)]
  target = _tree({**top, "layers": layers})
  restored = ocp.StandardCheckpointer().restore(path / "weights", target)
  cast = (lambda a: a) if jnp.dtype(meta["dtype"]) == jnp.dtype(dtype) else (
      lambda a: jax.jit(lambda x: x.astype(dtype), out_shardings=a.sharding)(a))
  consts = [W.layer_constants(arch, i) for i in range(arch.n_layers)]
  stacked = {k: jax.device_put(np.stack([c[k] for c in consts]), W.lead(specs.replicated()))
             for k in consts[0]}
  for s in tables.layer_specs(arch):        # stack name by name, dropping the per-layer arrays
    per_layer = [cast(restored["layers"][str(i)].pop(s.name)) for i in range(arch.n_layers)]
    stacked[s.name] = W.stack_layers(per_layer)
    del per_layer
  top = {"embed": cast(restored["embed"]), "final_norm": cast(restored["final_norm"]),
         "lm_head": None if "unembed" not in restored else cast(restored["unembed"])}
  return W.from_named(top, stacked, arch)


def _one_layer(sharding):
  """A stacked weight's sharding without its leading layer axis."""
  from jax.sharding import NamedSharding, PartitionSpec

  return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


def run_convert(args) -> int:
  """`flying-jax convert --model M --output DIR`."""
  from flying_jax.checkpoints import load_checkpoint

  card = load_model_card(args.model)
  if card.weights.format == "orbax":
    print("error: the model card already points at an orbax checkpoint", file=sys.stderr)
    return 2
  from flying_jax.model.heads import weight_rows

  widths = [w for w in (1, 2, 4, 8, 16, 32, 64) if w <= args.max_width]
  rows = weight_rows(card.arch, widths)
  host = W.resident_layout(load_checkpoint(card), card.arch, jnp.dtype(args.dtype), rows)
  save_resident(host, card.arch, args.output, card.name)
  print(f"wrote {args.output} ({card.name}, {args.dtype}, laid out for widths up to "
        f"{widths[-1]})")
  print(f"use it with a model card whose [weights] say: format = \"orbax\", path = \"{args.output}\"")
  return 0

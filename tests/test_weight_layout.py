"""The resident layout: every width's programs read their weights whole or as one contiguous run
of leading rows, never through a gather, a transpose or a strided slice (read in the optimized
HLO of every compiled step program), and the padding rows stay zeros."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.model.heads import plan_heads, weight_rows
from flying_jax.model.tables import spec_of
from flying_jax.model.weights import at, layer
from flying_jax.runtime.weight_reads import copies, weight_reads

PROJECTIONS = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}


def leaf(op_name: str) -> str:
  """The parameter a program argument's name ends with: weights.layers['attn']['wq'] -> wq."""
  return re.findall(r"\w+", op_name)[-1]


def param(engine, lw, name):
  """Tensor `name` of a layer's state, at the module path the weight table gives it."""
  return at(lw, spec_of(engine.card.arch, name).path)


def small_engine(mesh: str, widths, partitions):
  """SmolLM2's heads (9 query / 3 KV: padding and uneven splits) on one small layer."""
  card = load_model_card("smollm2-135m")
  arch = dataclasses.replace(card.arch, n_layers=1, vocab_size=512)
  card = dataclasses.replace(card, arch=arch,
                             weights=dataclasses.replace(card.weights, format="random"))
  preset = dataclasses.replace(load_mesh_preset(mesh), decode_buckets=(8,),
                               prefill_chunks=(32,), token_budget=40, partitions=partitions)
  return Engine(card, preset, EngineConfig(widths=widths, cache_dir=""))


@pytest.fixture(scope="module")
def engine_b1():
  """Base width 1: widths 1-8 and 4+1x4."""
  return small_engine("cpu-8", (1, 2, 4, 8), ("4+1x4",))


@pytest.fixture(scope="module")
def engine_b2():
  """Base width 2: widths 2-8 and 4+2x2."""
  return small_engine("cpu-8-tp2", (2, 4, 8), ("4+2x2",))


@pytest.fixture(params=["engine_b1", "engine_b2"])
def engine(request):
  return request.getfixturevalue(request.param)


def test_every_program_reads_weights_whole_or_as_leading_rows(engine):
  checked = 0
  for span, kind, shape in engine.registry.keys():
    if kind != "step":
      continue                              # the sampling program reads no weight
    hlo = engine.registry[(span, kind, shape)].as_text()
    found = copies(hlo, lambda n: n.startswith("weights."))
    lookups = [r for r in found if r.weight.startswith("weights.embed") and r.op == "gather"]
    assert lookups and [r for r in found if r not in lookups] == [], (span, shape, found)
    # ^ the token lookup gathers rows of the embeddings; nothing else rearranges a weight
    reads = weight_reads(hlo, lambda n: n.startswith("weights.layers"))
    seen = {}
    for r in reads:
      if leaf(r.weight) in PROJECTIONS:
        seen.setdefault(leaf(r.weight), set()).add(r.kind)
    assert set(seen) == PROJECTIONS, (span, seen)
    base = engine.preset.base_width         # an engine's own width reads its shard as it is
    want = "whole" if span.width == base else "rows"
    assert all(kinds == {want} for kinds in seen.values()), (span, seen)
    checked += 1
  assert checked >= 2 * 5                   # every width and the mixed partition's spans


def test_the_check_sees_gathers_transposes_and_strided_slices():
  """A negative control: the reads this layout avoids are reported."""
  w = jnp.ones((16, 64), jnp.float32)
  x = jnp.ones((4, 64), jnp.float32)
  idx = jnp.array([3, 1, 2], jnp.int32)
  programs = {
      "gather": lambda w_q, x, idx: x @ jnp.take(w_q, idx * 4, axis=0).T,
      "strided slice": lambda w_q, x, idx: x[:, :8] @ w_q[:, :8].T,
      "minor dynamic slice": lambda w_q, x, idx: x[:, :8] @ jax.lax.dynamic_slice_in_dim(
          w_q, idx[0] * 8, 8, axis=1).T,
  }
  for name, fn in programs.items():
    hlo = jax.jit(fn).lower(w, x, idx).compile().as_text()
    found = copies(hlo, lambda n: n == "w_q")
    assert found, (name, weight_reads(hlo, lambda n: n == "w_q"))
  fine = jax.jit(lambda w_q, x, idx: x @ jax.lax.dynamic_slice_in_dim(w_q, idx[0], 8, 0).T
                 ).lower(w, x, idx).compile().as_text()
  assert not copies(fine, lambda n: n == "w_q")
  assert {r.kind for r in weight_reads(fine, lambda n: n == "w_q")} == {"rows"}


def test_padding_rows_are_zero_and_every_run_fits(engine_b1):
  engine = engine_b1
  arch = engine.card.arch
  q_rows, kv_rows = weight_rows(arch, (1, 2, 4, 8))
  assert (q_rows, kv_rows) == (13, 4)         # 9 / 3 heads padded for the uneven splits
  hd = arch.head_dim
  lw = layer(engine.weights, 0)
  w = lambda name: param(engine, lw, name)
  assert w("wq").shape == (q_rows * hd, arch.dim) and w("wk").shape == (kv_rows * hd, arch.dim)
  for name in ("wq", "wo"):
    assert not np.asarray(w(name))[arch.n_heads * hd:].any()
  for name in ("wk", "wv"):
    assert not np.asarray(w(name))[arch.n_kv_heads * hd:].any()
  for w in (1, 2, 4, 8):
    plan = plan_heads(arch, w)
    assert plan.q_rows_needed <= q_rows and plan.kv_rows_needed <= kv_rows


def test_slice_check_runs_and_reports_the_run_reads():
  """The device check (`python -m flying_jax.bench.slice_check`) on small CPU shapes."""
  from flying_jax.bench.slice_check import check

  out = check(dim=64, rows=256, tokens=4, widths=(1, 4), dtype="float32")
  assert [r["reads"] for r in out] == [["dot:whole"], ["dynamic-slice:rows"]]
  assert out[0]["temp_bytes"] == 0 and out[1]["rows"] == 64
  assert all(r["sliced_ms"] > 0 and r["given_ms"] > 0 for r in out)


def test_each_device_holds_its_shard(engine_b2):
  """Base width 2: device j of every engine holds rows q_lo[j]:+q_size (KV likewise) and FFN
  half j of the one-device layout, and nothing else: half of every projection per device."""
  engine = engine_b2
  from flying_jax.model.heads import row_blocks
  from flying_jax.model.weights import resident_tensor
  from flying_jax.checkpoints import iter_random

  arch, t = engine.card.arch, engine.preset.base_width
  blocks = row_blocks(arch, (2, 4, 8), t)
  single = {x.name: resident_tensor(x.name, np.asarray(x.array), arch, np.float32,
                                    weight_rows(arch, (2, 4, 8)))
            for x in iter_random(arch, engine.card.weights.seed) if x.layer == 0}
  hd, lw = arch.head_dim, layer(engine.weights, 0)
  for name, lo, size in [("wq", blocks.q_lo, blocks.q_size), ("wo", blocks.q_lo, blocks.q_size),
                         ("wk", blocks.kv_lo, blocks.kv_size), ("wv", blocks.kv_lo, blocks.kv_size),
                         ("w_gate", None, None), ("w_up", None, None), ("w_down", None, None)]:
    shards = {s.device.id: np.asarray(s.data) for s in param(engine, lw, name).addressable_shards}
    assert len(shards) == 8
    for dev, local in shards.items():
      j = dev % t
      if lo is None:
        f = arch.ffn_dim // t
        want = single[name][j * f:(j + 1) * f]
      else:
        want = single[name][lo[j] * hd:(lo[j] + size) * hd]
        want = np.pad(want, ((0, size * hd - len(want)), (0, 0)))
      np.testing.assert_array_equal(local, want, err_msg=f"{name} on device {dev}")
  split = sum(param(engine, lw, n).nbytes for n in PROJECTIONS)
  per_device = sum(param(engine, lw, n).addressable_shards[0].data.nbytes for n in PROJECTIONS)
  assert per_device * t == split

"""The executable cache: a warm get loads what a cold one compiled, on the same devices, without
tracing; donation survives the round trip; anything unreadable is recompiled, never an error."""

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from flying_jax.runtime.exec_cache import FORMAT, ExecutableCache

N = 64


@pytest.fixture(scope="module")
def salt():
  """A constant baked into every test program, new each run: JAX's persistent compilation cache,
  if another test turned it on in this process, never holds these programs."""
  return 1.0 + random.random()


class Traced:
  """A donating program whose traces are counted on the Python side."""

  def __init__(self, salt):
    self.salt, self.traces = salt, 0

  def fn(self, a_NxN, b_NxN):
    self.traces += 1
    return a_NxN * self.salt + b_NxN, jnp.tanh(a_NxN @ b_NxN).sum()

  def lower(self):
    s = jax.ShapeDtypeStruct((N, N), jnp.float32)
    return jax.jit(self.fn, donate_argnums=0).lower(s, s)

  def key(self, name="traced"):
    return (name, N, "float32", self.salt)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((N, N)), jnp.float32),
          jnp.asarray(rng.standard_normal((N, N)), jnp.float32))


def _sub_mesh(ids):
  devs = np.array([jax.devices()[i] for i in ids]).reshape(2, 2)
  return Mesh(devs, ("x", "y"), axis_types=(AxisType.Auto,) * 2)


def _lower_sharded(mesh, salt):
  """A shard_map over `mesh` with collectives on both axes, its input donated."""
  def body(a):
    return jax.lax.psum(a * salt, "x") + jax.lax.axis_index("y")
  fn = jax.shard_map(body, mesh=mesh, in_specs=P("x", "y"), out_specs=P(None, "y"))
  s = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, P("x", "y")))
  return jax.jit(fn, donate_argnums=0).lower(s)


def test_warm_get_loads_without_tracing(tmp_path, salt):
  prog, dev = Traced(salt), [jax.devices()[0]]
  cold, hit = ExecutableCache(tmp_path).get_or_compile(prog.key(), prog.lower, dev)
  assert not hit and prog.traces == 1
  assert len(list(tmp_path.glob("*.exe"))) == 1 and not list(tmp_path.glob("*.tmp"))
  warm_cache = ExecutableCache(tmp_path)
  warm, hit = warm_cache.get_or_compile(prog.key(), prog.lower, dev)
  assert hit and prog.traces == 1
  assert (warm_cache.stats.hits, warm_cache.stats.misses) == (1, 0)
  for got, want in zip(warm(*_inputs()), cold(*_inputs())):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))   # bit-identical


def test_donated_argument_consumed_by_loaded_program(tmp_path, salt):
  prog, dev = Traced(salt), [jax.devices()[0]]
  cold, _ = ExecutableCache(tmp_path).get_or_compile(prog.key(), prog.lower, dev)
  warm, hit = ExecutableCache(tmp_path).get_or_compile(prog.key(), prog.lower, dev)
  assert hit
  for compiled in (cold, warm):
    a, b = _inputs()
    before = a.unsafe_buffer_pointer()
    out, _ = compiled(a, b)
    assert a.is_deleted() and not b.is_deleted()
    assert out.unsafe_buffer_pointer() == before          # written in place
    assert compiled.memory_analysis().alias_size_in_bytes == N * N * 4


def test_sub_mesh_program_loads_on_its_devices(tmp_path, salt):
  mesh = _sub_mesh([5, 4, 7, 6])                # devices 4..7, not in id order
  lower = lambda: _lower_sharded(mesh, salt)
  cold, hit = ExecutableCache(tmp_path).get_or_compile(("sharded", salt), lower, mesh)
  assert not hit
  warm, hit = ExecutableCache(tmp_path).get_or_compile(("sharded", salt), lower, mesh)
  assert hit
  x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
  outs = []
  for compiled in (cold, warm):
    a = jax.device_put(x, NamedSharding(mesh, P("x", "y")))
    out = compiled(a)
    assert a.is_deleted()
    assert {d.id for d in out.sharding.device_set} == {4, 5, 6, 7}
    outs.append(np.asarray(out))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_other_key_or_devices_miss(tmp_path, salt):
  cache, prog = ExecutableCache(tmp_path), Traced(salt)
  cache.get_or_compile(prog.key(), prog.lower, [jax.devices()[0]])
  _, hit = cache.get_or_compile(prog.key("other"), prog.lower, [jax.devices()[0]])
  assert not hit
  high, low = _sub_mesh([4, 5, 6, 7]), _sub_mesh([0, 1, 2, 3])
  cache.get_or_compile(("sharded", salt), lambda: _lower_sharded(high, salt), high)
  _, hit = cache.get_or_compile(("sharded", salt), lambda: _lower_sharded(low, salt), low)
  assert not hit
  assert (cache.stats.hits, cache.stats.misses) == (0, 4)
  with pytest.raises(ValueError, match="runs on devices"):   # filed under devices it avoids
    cache.get_or_compile(("liar", salt), lambda: _lower_sharded(low, salt), high)
  with pytest.raises(ValueError, match="stable repr"):
    cache.get_or_compile(("fn", prog.fn), prog.lower, [jax.devices()[0]])


def _spoil(path, how):
  data = path.read_bytes()
  if how == "flipped":
    mid = len(data) // 2
    data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
  elif how == "truncated":
    data = data[:len(data) // 2]
  elif how == "foreign":                        # a valid checksum over something else
    body = b"not a pickle of ours"
    data = FORMAT + hashlib.sha256(body).digest() + body
  else:
    data = b""
  path.write_bytes(data)


@pytest.mark.parametrize("how", ["flipped", "truncated", "foreign", "empty"])
def test_bad_file_is_recompiled_and_replaced(tmp_path, salt, how):
  prog, dev = Traced(salt), [jax.devices()[0]]
  ExecutableCache(tmp_path).get_or_compile(prog.key(), prog.lower, dev)
  (path,) = tmp_path.glob("*.exe")
  _spoil(path, how)
  cache = ExecutableCache(tmp_path)
  compiled, hit = cache.get_or_compile(prog.key(), prog.lower, dev)
  assert not hit and (cache.stats.rejected, cache.stats.misses) == (1, 1)
  np.asarray(compiled(*_inputs())[1])
  _, hit = ExecutableCache(tmp_path).get_or_compile(prog.key(), prog.lower, dev)
  assert hit                                    # overwritten with a good file


def test_unserializable_program_is_used_but_not_stored(tmp_path, salt):
  def fn(a):                                    # host callbacks do not serialize
    return jax.pure_callback(lambda x: np.asarray(x) * salt, jax.ShapeDtypeStruct((4,), a.dtype), a)
  lower = lambda: jax.jit(fn).lower(jax.ShapeDtypeStruct((4,), jnp.float32))
  cache = ExecutableCache(tmp_path)
  for _ in range(2):
    compiled, hit = cache.get_or_compile(("callback", salt), lower, [jax.devices()[0]])
    assert not hit
    np.testing.assert_allclose(np.asarray(compiled(jnp.ones(4))), salt)
  assert cache.stats.unsaved == 2 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("directory", [None, ""])
def test_disabled_cache_always_compiles(directory, salt):
  cache, prog = ExecutableCache(directory), Traced(salt)
  for _ in range(2):
    _, hit = cache.get_or_compile(prog.key(), prog.lower, [jax.devices()[0]])
    assert not hit
  assert prog.traces == 2 and not cache.enabled
  assert (cache.stats.hits, cache.stats.misses) == (0, 2)


_PROCESS = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    exec_dir, xla_dir, out = sys.argv[1:4]
    if xla_dir:
      jax.config.update("jax_compilation_cache_dir", xla_dir)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
      jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import test_exec_cache as t
    from flying_jax.runtime.exec_cache import ExecutableCache
    from jax.sharding import NamedSharding, PartitionSpec as P
    cache, prog, mesh = ExecutableCache(exec_dir), t.Traced(1.5), t._sub_mesh([4, 5, 6, 7])
    one, _ = cache.get_or_compile(prog.key(), prog.lower, [jax.devices()[0]])
    two, _ = cache.get_or_compile(("sharded", 1.5), lambda: t._lower_sharded(mesh, 1.5), mesh)
    x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    np.savez(out, *[np.asarray(r) for r in one(*t._inputs())],
             np.asarray(two(jax.device_put(x, NamedSharding(mesh, P("x", "y"))))))
    s = cache.stats
    print(json.dumps(dict(hits=s.hits, misses=s.misses, unsaved=s.unsaved, traces=prog.traces,
                          load_s=s.load_s, compile_s=s.compile_s)))
    """)


def _run_process(tmp_path, exec_dir, xla_dir, name):
  out = tmp_path / f"{name}.npz"
  res = subprocess.run(
      [sys.executable, "-c", _PROCESS, str(exec_dir), str(xla_dir), str(out)],
      capture_output=True, text=True, timeout=120, env=os.environ,
      cwd=os.path.dirname(__file__))
  assert res.returncode == 0, res.stderr[-3000:]
  with np.load(out) as z:
    arrays = [z[k] for k in sorted(z.files)]
  return json.loads(res.stdout.strip().splitlines()[-1]), arrays


def test_fresh_process_loads_what_another_stored(tmp_path):
  exec_dir, xla_dir, other = tmp_path / "exec", tmp_path / "xla", tmp_path / "other"
  first, want = _run_process(tmp_path, exec_dir, xla_dir, "first")
  assert (first["hits"], first["misses"], first["unsaved"], first["traces"]) == (0, 2, 0, 1)
  second, got = _run_process(tmp_path, exec_dir, "", "second")
  assert (second["hits"], second["misses"], second["traces"]) == (2, 0, 0)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  # JAX's persistent cache could answer these compiles now, but a reloaded XLA:CPU executable
  # cannot be serialized again: misses compile with JAX's cache off, so they are stored
  third, got = _run_process(tmp_path, other, xla_dir, "third")
  assert (third["misses"], third["unsaved"]) == (2, 0)
  assert len(list(other.glob("*.exe"))) == 2
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)

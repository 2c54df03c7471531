"""Compiled programs kept on disk as serialized executables: a warm start neither traces nor lowers.

JAX's persistent compilation cache (`jax_compilation_cache_dir`) only skips the XLA compile: every
start still traces and lowers each program to find its cache key. Here the caller names a program
with a key of its own (what it would build the program from), and a hit loads the executable
straight from a file (`jax.experimental.serialize_executable`); `lower` is never called.

The file name digests everything that could make a stored executable wrong for this process: the
caller's key, jax/jaxlib versions, the backend and its version, the device kinds and the ids of the
devices the program runs on, the jax options that change lowering, XLA_FLAGS, the host CPU (XLA:CPU
emits code for its features) and the source of the `flying_jax` package (any code change misses).

On jax 0.10.2 / XLA:CPU an executable that was itself deserialized (ours, or one served by JAX's
persistent compilation cache) serializes again without its object code and fails when called in the
next process ("Function ... not found"). So only freshly compiled executables are stored: a compile
that JAX's persistent cache answered is used but not stored (`CacheStats.unsaved`), on every backend
(others are unverified), and misses compile with JAX's persistent cache off in their thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import pathlib
import pickle
import platform
import tempfile
import threading
import time
from typing import Callable, Sequence

import jax
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)

FORMAT = b"FJXEXEC1"            # bump when the file layout changes
_DIGEST_LEN = 32                # sha256 of the body, right after FORMAT
_PERSISTENT_HIT = "/jax/compilation_cache/cache_hits"
# jax options that change what a traced function lowers to (the caller's key cannot see them)
_LOWERING_OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                     "jax_threefry_partitionable", "jax_use_shardy_partitioner",
                     "jax_numpy_dtype_promotion", "jax_numpy_rank_promotion", "jax_enable_checks")

Devices = Sequence[jax.Device] | jax.sharding.Mesh | jax.sharding.Sharding


@dataclasses.dataclass
class CacheStats:
  """What the cache did since it was made: for start-up reports."""
  hits: int = 0
  misses: int = 0
  load_s: float = 0.0        # reading and loading the hits
  compile_s: float = 0.0     # lowering and compiling the misses
  save_s: float = 0.0        # serializing and writing them
  rejected: int = 0          # files that did not load (corrupt, truncated, foreign): recompiled
  unsaved: int = 0           # compiled but not stored (not serializable, unwritable directory, ..)

  def summary(self) -> str:
    return (f"{self.hits} loaded in {self.load_s:.2f} s, {self.misses} compiled in "
            f"{self.compile_s:.2f} s (+{self.save_s:.2f} s saving)"
            + (f", {self.rejected} bad files replaced" if self.rejected else "")
            + (f", {self.unsaved} not saved" if self.unsaved else ""))


class ExecutableCache:
  """Serialized executables in `directory`, one file per program.

  `directory` None or "" disables the cache: every `get_or_compile` compiles. Safe to share between
  threads and processes: files are written whole under a temporary name and renamed into place, and
  a file that does not load is recompiled and overwritten, never an error. Files are pickles: only
  point this at a directory that no one else can write (loading one may run its code).
  """

  def __init__(self, directory: str | os.PathLike | None):
    self.directory = pathlib.Path(directory) if directory else None
    self.stats = CacheStats()
    self._lock = threading.Lock()

  @property
  def enabled(self) -> bool:
    return self.directory is not None

  def get_or_compile(self, key: tuple, lower: Callable[[], jax.stages.Lowered],
                     devices: Devices) -> tuple[jax.stages.Compiled, bool]:
    """The executable of `key` on `devices`, and whether it came from disk.

    `key` holds plain values with a stable repr (strings, ints, frozen dataclasses) that decide the
    program for the caller; `lower()` is called only on a miss. `devices` are the devices the
    program runs on (a mesh or sharding gives its devices): a program over a sub-mesh is stored
    under those device ids and loads onto exactly those devices.
    """
    devs = device_list(devices)
    name = self._file_name(key, devs) if self.enabled else None
    if name is not None:
      compiled = self._load(self.directory / name, devs)
      if compiled is not None:
        return compiled, True
    t0 = time.perf_counter()
    hits_before = _persistent_hits() if name else 0
    with _jax_cache_off() if name else contextlib.nullcontext():
      compiled = lower().compile()
    served_by_jax_cache = name is not None and _persistent_hits() != hits_before
    dt = time.perf_counter() - t0
    ran_on = _check_devices(compiled, devs, key)
    with self._lock:
      self.stats.misses += 1
      self.stats.compile_s += dt
    if name is not None:
      if served_by_jax_cache:
        log.debug("not storing %r: JAX's persistent cache loaded it, and a reloaded XLA:CPU "
                  "executable serializes without its code", key)
        self._count(unsaved=1)
      else:
        self._save(self.directory / name, compiled, ran_on, key)
    return compiled, False

  def _file_name(self, key: tuple, devs: list[jax.Device]) -> str:
    text = repr(key)
    if " at 0x" in text:
      raise ValueError(f"executable cache key has no stable repr (an object address): {text}")
    client = devs[0].client
    parts = (FORMAT, text, jax.__version__, _jaxlib_version(), client.platform,
             client.platform_version, sorted({d.device_kind for d in devs}),
             [d.id for d in devs], _lowering_options(), _host(devs[0].platform),
             source_digest())
    return hashlib.sha256(repr(parts).encode()).hexdigest() + ".exe"

  def _load(self, path: pathlib.Path, devs: list[jax.Device]) -> jax.stages.Compiled | None:
    t0 = time.perf_counter()
    try:
      data = path.read_bytes()
    except FileNotFoundError:
      return None
    except OSError as e:
      log.debug("executable cache: cannot read %s: %s", path, e)
      self._count(rejected=1)
      return None
    try:
      body = data[len(FORMAT) + _DIGEST_LEN:]
      if (data[:len(FORMAT)] != FORMAT
          or data[len(FORMAT):len(FORMAT) + _DIGEST_LEN] != hashlib.sha256(body).digest()):
        raise ValueError("wrong format or checksum (truncated or corrupt)")
      entry = pickle.loads(body)
      by_id = {d.id: d for d in devs}
      run_on = [by_id[i] for i in entry["device_ids"]]   # the executable's own device order
      compiled = serialize_executable.deserialize_and_load(
          entry["payload"], entry["in_tree"], entry["out_tree"], backend=devs[0].client,
          execution_devices=run_on)
    except Exception as e:  # anything unreadable is recompiled, never the user's problem
      log.debug("executable cache: ignoring %s (%s: %s)", path.name, type(e).__name__, e)
      self._count(rejected=1)
      return None
    self._count(hits=1, load_s=time.perf_counter() - t0)
    return compiled

  def _save(self, path: pathlib.Path, compiled: jax.stages.Compiled, ran_on: list[int], key):
    t0 = time.perf_counter()
    try:
      payload, in_tree, out_tree = serialize_executable.serialize(compiled)
      body = pickle.dumps({"payload": payload, "in_tree": in_tree, "out_tree": out_tree,
                           "device_ids": ran_on}, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # e.g. closed-over constants, host callbacks: keep it, do not store it
      log.debug("executable cache: cannot serialize %r (%s: %s)", key, type(e).__name__, e)
      self._count(unsaved=1)
      return
    try:
      _write_atomically(path, FORMAT + hashlib.sha256(body).digest() + body)
    except OSError as e:
      log.debug("executable cache: cannot write %s: %s", path, e)
      self._count(unsaved=1)
      return
    self._count(save_s=time.perf_counter() - t0)

  def _count(self, **deltas):
    with self._lock:
      for field, d in deltas.items():
        setattr(self.stats, field, getattr(self.stats, field) + d)


def device_list(devices: Devices) -> list[jax.Device]:
  """The devices a program runs on, in mesh order: a mesh's or named sharding's devices, another
  sharding's devices by id, or the given sequence."""
  if isinstance(devices, jax.sharding.NamedSharding):
    devices = devices.mesh
  if isinstance(devices, jax.sharding.Mesh):
    out = list(devices.devices.flat)
  elif isinstance(devices, jax.sharding.Sharding):
    out = sorted(devices.device_set, key=lambda d: d.id)
  else:
    out = list(devices)
  if not out:
    raise ValueError("a program runs on at least one device")
  return out


def _check_devices(compiled: jax.stages.Compiled, devs: list[jax.Device], key) -> list[int]:
  """The ids of the devices `compiled` runs on, in its own order (loading needs that order), after
  checking that they are the devices its key was filed under: else a warm start would load it on
  devices the caller did not mean."""
  ran_on = [d.id for d in compiled.runtime_executable().local_devices()]
  here = jax.process_index()        # across processes, each runs it on the devices it holds
  mine = sorted(d.id for d in devs if d.process_index == here)
  if sorted(ran_on) != mine:
    raise ValueError(f"program {key!r} runs on devices {sorted(ran_on)}, but the executable "
                     f"cache was given {mine}")
  return ran_on


def _write_atomically(path: pathlib.Path, data: bytes):
  """Whole files only: readers in other processes see the old file or the new one, never half."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


@functools.cache
def source_digest() -> str:
  """sha256 of the `flying_jax` package's Python sources (paths and bytes): any code change
  changes every file name. Computed once per process, on first use."""
  import flying_jax
  root = pathlib.Path(flying_jax.__file__).parent
  h = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    h.update(str(path.relative_to(root)).encode() + b"\0")
    h.update(path.read_bytes() + b"\0")
  return h.hexdigest()


@functools.cache
def _jaxlib_version() -> str:
  import jaxlib
  return jaxlib.__version__


@functools.cache
def _host(platform_name: str) -> tuple:
  """What an XLA:CPU executable depends on beyond the backend version: the host's CPU features
  (code compiled for AVX-512 must not load on a machine without it). Empty for other backends."""
  if platform_name != "cpu":
    return ()
  flags = ""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    pass
  return platform.machine(), platform.processor(), " ".join(sorted(flags.split()))


def _lowering_options() -> tuple:
  values = jax.config.values
  return tuple((name, values.get(name)) for name in _LOWERING_OPTIONS) + (
      ("XLA_FLAGS", os.environ.get("XLA_FLAGS", "")),)


class _PersistentHits(threading.local):
  count = 0


_listener_lock = threading.Lock()


@functools.cache
def _hit_counter() -> _PersistentHits:
  """Per-thread count of compiles that JAX's persistent compilation cache answered (a monitoring
  event, recorded in the compiling thread). One listener per process, registered on first use."""
  hits = _PersistentHits()

  def listen(event: str, **_):
    if event == _PERSISTENT_HIT:
      hits.count += 1

  jax.monitoring.register_event_listener(listen)
  return hits


def _jax_cache_off():
  """JAX's persistent compilation cache off in this thread (a program it served could not be
  stored here, see the module docstring); a no-op if this JAX moved the option."""
  try:
    from jax._src.config import enable_compilation_cache
  except ImportError:  # pragma: no cover
    return contextlib.nullcontext()
  return enable_compilation_cache(False)


def _persistent_hits() -> int:
  with _listener_lock:    # one listener, even when two threads ask first at once
    return _hit_counter().count

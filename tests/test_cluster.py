"""One engine over two processes of 4 simulated CPU devices each, joined with jax.distributed
(`flying-jax serve --coordinator ...`): the leader serves gRPC and owns the scheduler, the
follower replays its dispatches. SmolLM2 gives the golden greedy ids at every width (width 8
spans both processes) and through switches; SIGTERM on the leader stops both with exit 0."""

import concurrent.futures
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from flying_jax.cluster.join import ClusterError, ClusterSpec
from flying_jax.config import ConfigError, load_mesh_preset
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc
from test_smollm2 import write_preset

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "smollm2-135m-instruct.json"
TOKEN = "cluster-test"
ADMIN = [("authorization", f"Bearer {TOKEN}")]
START_S = 900                    # two processes compiling every width on two shared cores


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Proc:
  """A `flying-jax serve` process whose output is read as it comes (no pipe fills up)."""

  def __init__(self, args, env, log: Path):
    self.lines: list[str] = []
    self.log = log
    self.p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    with open(self.log, "w") as f:
      for line in self.p.stdout:
        self.lines.append(line)
        f.write(line)
        f.flush()

  def wait_for(self, pattern: str, timeout: float) -> re.Match:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      for line in list(self.lines):
        m = re.search(pattern, line)
        if m:
          return m
      if self.p.poll() is not None:
        break
      time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in {self.log}:\n" + "".join(self.lines[-30:]))


@pytest.fixture(scope="module")
def golden():
  return json.loads(GOLDEN.read_text())["cases"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  """The leader (process 0, serving on a free port) and its follower, once ready."""
  tmp = tmp_path_factory.mktemp("cluster")
  preset = dataclasses.replace(load_mesh_preset("cpu-2x4"), name="cpu-2x4-small",
                               decode_buckets=(8,), prefill_chunks=(32,), token_budget=40)
  mesh = tmp / "cpu-2x4-small.toml"
  write_preset(mesh, preset)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PJRT_NPROC="16")
  coordinator, port = f"127.0.0.1:{free_port()}", free_port()
  procs = []
  for i in range(2):
    args = [sys.executable, "-m", "flying_jax.cli", "serve", "--model", "smollm2-135m",
            "--mesh", str(mesh), "--port", str(port if i == 0 else 0), "--policy", "static:1",
            "--admin-token", TOKEN, "--coordinator", coordinator, "--num-processes", "2",
            "--process-id", str(i)]
    procs.append(Proc(args, env, tmp / f"process-{i}.log"))
  leader, follower = procs
  try:
    follower.wait_for(r"process 1 follows the leader \((\d+) partitions", START_S)
    leader.wait_for(r"^flying-jax: ready", START_S)
    yield leader, follower, f"127.0.0.1:{port}"
  finally:
    for p in procs:
      if p.p.poll() is None:
        p.p.kill()


def generate(target, prompt_ids, max_tokens, on_first=None) -> list[int]:
  with grpc.insecure_channel(target) as ch:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), sampling=pb.Sampling(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    ids = []
    for resp in pb_grpc.GenerationStub(ch).Generate(req, timeout=600):
      if not ids and on_first is not None:
        on_first()
      ids += list(resp.token_ids)
    return ids


def admin(target, call, request):
  with grpc.insecure_channel(target) as ch:
    return getattr(pb_grpc.AdminStub(ch), call)(request, metadata=ADMIN, timeout=300)


def stats(target) -> pb.Stats:
  with grpc.insecure_channel(target) as ch:
    return pb_grpc.GenerationStub(ch).GetStats(pb.StatsRequest(), timeout=60)


def all_golden(target, golden, on_first=None) -> dict:
  with concurrent.futures.ThreadPoolExecutor(len(golden)) as pool:
    futs = {name: pool.submit(generate, target, c["prompt_ids"], len(c["greedy_ids"]),
                              on_first) for name, c in golden.items()}
    return {name: f.result() for name, f in futs.items()}


def test_presets_say_how_their_devices_spread_over_hosts():
  assert [(load_mesh_preset(n).hosts, load_mesh_preset(n).host_devices)
          for n in ("cpu-8", "cpu-2x4", "gpu-2x8", "tpu-v5e-16")] == [(1, 8), (2, 4), (2, 8), (4, 4)]
  with pytest.raises(ConfigError, match="hosts 3 must divide"):
    dataclasses.replace(load_mesh_preset("cpu-2x4"), hosts=3)


def test_a_preset_for_another_host_count_is_refused(tmp_path):
  """cpu-8 is laid out for one host: two processes holding its devices refuse it, both exit 2."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PJRT_NPROC="16")
  coordinator = f"127.0.0.1:{free_port()}"
  procs = [Proc([sys.executable, "-m", "flying_jax.cli", "serve", "--model", "tiny", "--mesh",
                 "cpu-8", "--width", "8", "--port", "0", "--coordinator", coordinator,
                 "--num-processes", "2", "--process-id", str(i)], env,
                tmp_path / f"process-{i}.log") for i in range(2)]
  try:
    for p in procs:
      assert p.p.wait(300) == 2
      p.wait_for(r"mesh cpu-8 is laid out for 1 host\(s\); its devices are held by 2 processes", 5)
  finally:
    for p in procs:
      if p.p.poll() is None:
        p.p.kill()


def test_spec_flags_go_together():
  assert ClusterSpec("h:1", 2, 1).num_processes == 2
  for bad in [("h:1", None, None), ("h:1", 2, 2), ("h", 2, 0), (None, 2, 0), ("h:1", 0, 0)]:
    with pytest.raises(ClusterError):
      ClusterSpec(*bad)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_golden_greedy_ids_at_every_width_across_two_processes(cluster, golden, width):
  leader, follower, target = cluster
  admin(target, "PinPartition", pb.PinPartitionRequest(partition=str(width), strategy="migrate"))
  assert stats(target).partition == (f"{width}" if width == 8 else f"{width}x{8 // width}")
  got = all_golden(target, golden)
  for name, case in golden.items():
    assert got[name] == case["greedy_ids"], f"{name} at width {width}"
  after = stats(target)
  assert after.running == 0 and after.waiting == 0 and after.kv_usage == 0.0   # no page leaked
  assert follower.p.poll() is None


def test_switches_mid_generation_keep_golden_ids(cluster, golden):
  """Every golden request starts on one width; at the first token the engine migrates to TP8
  (across both processes), then to width 2 recomputing, then pauses into width 4 and back."""
  leader, follower, target = cluster
  admin(target, "PinPartition", pb.PinPartitionRequest(partition="1", strategy="migrate"))
  plan = [("8", "migrate"), ("2", "recompute"), ("4", "pause"), ("2", "migrate")]
  started = threading.Event()
  switcher_done = []

  def switch():
    started.wait(300)
    for partition, strategy in plan:
      admin(target, "PinPartition", pb.PinPartitionRequest(partition=partition, strategy=strategy))
    switcher_done.append(True)

  t = threading.Thread(target=switch)
  t.start()
  got = all_golden(target, golden, on_first=started.set)
  t.join(300)
  assert switcher_done
  for name, case in golden.items():
    assert got[name] == case["greedy_ids"], name
  s = stats(target)
  assert s.switches_by_reason_strategy and s.kv_usage == 0.0 and s.running == 0
  assert follower.p.poll() is None


def test_sigterm_on_the_leader_stops_both_processes_with_exit_0(cluster):
  leader, follower, target = cluster
  leader.p.send_signal(signal.SIGTERM)
  assert leader.p.wait(120) == 0
  assert follower.p.wait(120) == 0
  follower.wait_for(r"the leader stopped \(exit 0\)", 5)
  leader.wait_for(r"lockstep: \d+ messages", 5)


def test_a_killed_follower_fails_the_stream_and_the_leader_exits_3(tmp_path):
  """The tiny model on width 2: the follower is killed mid-stream; the stream ends with an error
  (the step's collective fails) instead of hanging, and the leader stops with exit 3."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PJRT_NPROC="16")
  coordinator, port = f"127.0.0.1:{free_port()}", free_port()
  procs = [Proc([sys.executable, "-m", "flying_jax.cli", "serve", "--model", "tiny", "--mesh",
                 "cpu-2x4", "--width", "2", "--port", str(port if i == 0 else 0), "--coordinator",
                 coordinator, "--num-processes", "2", "--process-id", str(i),
                 "--heartbeat-timeout", "10"], env, tmp_path / f"process-{i}.log")
           for i in range(2)]
  leader, follower = procs
  try:
    follower.wait_for(r"follows the leader", START_S)
    leader.wait_for(r"^flying-jax: ready", START_S)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
      req = pb.GenerateRequest(text="w1 w2", sampling=pb.Sampling(
          temperature=0.0, max_tokens=2000, ignore_eos=True))
      call = pb_grpc.GenerationStub(ch).Generate(req, timeout=120)
      next(call)
      follower.p.kill()
      t0 = time.monotonic()
      with pytest.raises(grpc.RpcError) as failed:
        for _ in call:
          pass
      assert failed.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
      assert time.monotonic() - t0 < 60
    assert leader.p.wait(60) == 3               # at once, not at JAX's heartbeat timeout
    leader.wait_for(r"a step failed across the cluster", 5)
  finally:
    for p in procs:
      if p.p.poll() is None:
        p.p.kill()


SCRIPT = """
import json, sys
from flying_jax.cluster.join import ClusterSpec
from flying_jax.offline import LLM
from flying_jax.sampling import SamplingParams

llm = LLM(model="tiny", mesh="cpu-2x4", width=2, progress=False,
          cluster=ClusterSpec(sys.argv[1], 2, int(sys.argv[2])))
outs = llm.generate(["w1 w2 w3", "w4", "w5 w6"], SamplingParams(temperature=0, max_tokens=6),
                    use_tqdm=False)
print("ids", json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
try:
  llm.generate("w1", SamplingParams(max_tokens=10**6))
except Exception as e:
  print("refused", type(e).__name__, e, flush=True)
llm.close()
"""


def test_llm_generate_on_two_processes_gives_every_process_the_outputs(tmp_path):
  """The offline API as one script on both processes: the leader schedules, both return its
  outputs (the single-process engine's ids), a refused request raises on both, close ends both."""
  from flying_jax.offline import LLM
  from flying_jax.sampling import SamplingParams

  script = tmp_path / "offline.py"
  script.write_text(SCRIPT)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PJRT_NPROC="16")
  coordinator = f"127.0.0.1:{free_port()}"
  procs = [Proc([sys.executable, str(script), coordinator, str(i)], env,
                tmp_path / f"process-{i}.log") for i in range(2)]
  try:
    codes = [p.p.wait(START_S) for p in procs]
    ids = [json.loads(p.wait_for(r"^ids (.*)$", 5).group(1)) for p in procs]
    refused = [p.wait_for(r"^refused (\w+) (.*)$", 5) for p in procs]
  finally:
    for p in procs:
      if p.p.poll() is None:
        p.p.kill()
  assert codes == [0, 0], [p.lines[-5:] for p in procs]
  alone = LLM(model="tiny", mesh="cpu-2x4", width=2, progress=False)
  want = [o.outputs[0].token_ids for o in alone.generate(
      ["w1 w2 w3", "w4", "w5 w6"], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)]
  assert ids[0] == ids[1] == want
  assert refused[0].group(1) == "RequestRejected" and "max_tokens" in refused[0].group(2)
  assert refused[1].group(1) == "RuntimeError" and "leader's generate failed" in refused[1].group(2)

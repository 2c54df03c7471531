"""Control that tells the truth: admin calls, malformed messages and gauges, through real gRPC.

One server (tiny model, widths 1, 2 and 8) for the module. Every answer is checked against what
the engine then does: a refused call changes nothing, an accepted pin is where the engine goes,
a pending drain shows in GetStats and Prometheus, gauges follow aborts with no step after them.
The last test is a seeded fuzz of the running server.
"""

import dataclasses
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc
from flying_jax.serving.proto import jetstream_pb2 as js
from flying_jax.tokenizers import load_tokenizer
from grpc_helpers import running_server, code_of, gauge, no_leaks, offline, prompts, scrape

TOKEN = "t0ken"
ADMIN = [("authorization", f"Bearer {TOKEN}")]
LONG = 300                     # tokens of the streams that keep groups busy during admin calls


@pytest.fixture(scope="module")
def engine():
  card = load_model_card("tiny")
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,),
                               prefill_chunks=(32,), token_budget=40, partitions=())
  return Engine(card, preset, EngineConfig(widths=(1, 2, 8), width=1, max_pause_s=1.0),
                tokenizer=load_tokenizer(card))


@pytest.fixture(scope="module")
def reference(engine):
  texts = prompts(24, seed=7)
  return texts, [ids for ids, _ in offline(engine, texts, max_tokens=LONG)]


@pytest.fixture(scope="module")
def server(engine, reference):
  with running_server(engine, TOKEN) as th:
    yield th


@pytest.fixture(scope="module")
def channel(server):
  with grpc.insecure_channel(server.target) as ch:
    yield ch


def admin(channel):
  return pb_grpc.AdminStub(channel)


def stats(channel) -> pb.Stats:
  return pb_grpc.GenerationStub(channel).GetStats(pb.StatsRequest())


def pin(channel, partition, strategy="") -> pb.AdminReply:
  return admin(channel).PinPartition(pb.PinPartitionRequest(partition=partition,
                                                            strategy=strategy), metadata=ADMIN)


def start_streams(channel, texts, max_tokens=LONG):
  """Streams that have produced their first token (so they run), with what they produced."""
  stub = pb_grpc.GenerationStub(channel)
  calls = []
  for i, text in enumerate(texts):
    req = pb.GenerateRequest(text=text, sampling=pb.Sampling(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    call = stub.Generate(req, timeout=300)
    calls.append((call, list(next(call).token_ids)))
  return calls


def finish(calls) -> list[list[int]]:
  return [first + [t for r in call for t in r.token_ids] for call, first in calls]


def idle_at(channel, server, partition: str):
  assert no_leaks(server)
  st = stats(channel)
  assert (st.partition, st.running, st.waiting, st.paused, st.kv_usage) == (partition, 0, 0, 0, 0)
  assert st.pending_partition == ""


# ---------------------------------------------------------------- 1: refused pins change nothing
def test_a_refused_pin_changes_neither_policy_nor_partition(channel, server):
  before = stats(channel)
  for partition, strategy, match in [("2", "teleport", "unknown switch strategy 'teleport'"),
                                     ("4", "drain", "not compiled"),
                                     ("banana", "migrate", "partition")]:
    code, details = code_of(lambda: pin(channel, partition, strategy))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and match in details, details
    after = stats(channel)
    assert (after.policy, after.pinned_partition, after.partition, after.switches) == \
        (before.policy, before.pinned_partition, before.partition, before.switches)
  list(pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(
      text="w1 w2", sampling=pb.Sampling(temperature=0.0, max_tokens=3))))
  after = stats(channel)
  assert (after.partition, after.switches) == (before.partition, before.switches)


# ---------------------------------------------------------------- 2: the latest decision wins
def test_a_pin_supersedes_a_pending_drain_and_the_answer_says_where_it_goes(channel, server,
                                                                            reference):
  texts, ref = reference
  pin(channel, "1", "recompute")
  calls = start_streams(channel, texts[:8])
  reply = pin(channel, "8", "drain")               # DP groups busy: the drain waits
  assert reply.stats.partition == "1x8" and reply.stats.pending_partition == "8"
  assert reply.stats.pending_reason == "pin/drain" and reply.stats.pinned_partition == "8"
  m = scrape(server)
  assert gauge(m, "flying_partition_pending_info", partition="8") == 1.0
  assert gauge(m, "flying_partition_pending_seconds") >= 0.0
  reply = pin(channel, "2", "migrate")             # supersedes the drain, cuts over at once
  assert reply.stats.partition == "2x4" and reply.stats.pending_partition == ""
  assert reply.stats.superseded_drains == 1 and reply.stats.pinned_partition == "2"
  assert gauge(scrape(server), "flying_partition_pending_info", partition="8") == 0.0
  reply = pin(channel, "8", "drain")               # pending again, then a policy supersedes it
  assert reply.stats.pending_partition == "8"
  reply = admin(channel).SetPolicy(pb.SetPolicyRequest(policy="static:1"), metadata=ADMIN)
  assert reply.stats.superseded_drains == 2 and reply.stats.policy == "static"
  assert reply.stats.pinned_partition == "1"
  deadline = time.monotonic() + 10                 # the static policy drains to 1 at a step
  while stats(channel).pending_partition != "1x8" and stats(channel).partition != "1x8":
    assert time.monotonic() < deadline
    time.sleep(0.01)
  reply = admin(channel).ReleasePartition(pb.ReleasePartitionRequest(), metadata=ADMIN)
  assert reply.stats.pending_partition == "" and reply.stats.policy == "none"
  where = reply.stats.partition
  outputs = finish(calls)
  assert outputs == [ref[i] for i in range(8)]      # token for token through every decision
  idle_at(channel, server, where)                  # no policy: it stays where the release left it


# ---------------------------------------------------------------- 3: malformed messages
MALFORMED = {
    "invalid UTF-8": b"\x12\x0dhello \xff\xfe world",
    "corrupt wire bytes": b"\xff\xff\xff\xff",
    "overlong varint": b"\x08" + b"\xff" * 11,
    "truncated": b"\x12\x20hello",
}
METHODS = [("/flying_jax.v1.Generation/Generate", "unary_stream"),
           ("/flying_jax.v1.Generation/Tokenize", "unary_unary"),
           ("/flying_jax.v1.Generation/GetStats", "unary_unary"),
           ("/flying_jax.v1.Admin/PinPartition", "unary_unary"),
           ("/jetstream_proto.Orchestrator/Decode", "unary_stream"),
           ("/jetstream_proto.Orchestrator/HealthCheck", "unary_unary"),
           ("/grpc.health.v1.Health/Check", "unary_unary"),
           ("/grpc.health.v1.Health/Watch", "unary_stream"),
           ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream")]


def raw_call(channel, method, kind, data: bytes):
  fn = getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)
  if kind == "unary_unary":
    return fn(data, timeout=10, metadata=ADMIN)
  if kind == "unary_stream":
    return list(fn(data, timeout=10, metadata=ADMIN))
  return list(fn(iter([data]), timeout=10))


@pytest.mark.parametrize("method,kind", METHODS, ids=[m.rsplit("/", 1)[1] for m, _ in METHODS])
def test_malformed_messages_get_invalid_argument_on_every_method(channel, server, method, kind):
  for what, data in MALFORMED.items():
    code, details = code_of(lambda: raw_call(channel, method, kind, data))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, code, details)
    assert "malformed request message" in details
  health = health_pb2_grpc.HealthStub(channel)
  assert health.Check(health_pb2.HealthCheckRequest()).status == \
      health_pb2.HealthCheckResponse.SERVING
  assert no_leaks(server)


# ---------------------------------------------------------------- 4: gauges follow aborts
def test_gauges_follow_aborts_when_no_step_follows(channel, server, reference):
  texts, _ = reference
  pin(channel, "1", "recompute")
  calls = start_streams(channel, texts[:16])
  reply = pin(channel, "8", "pause")
  assert reply.stats.partition == "8"
  for call, _ in calls:
    call.cancel()
  assert no_leaks(server)                  # nothing left to step: only commands ran since
  st, m = stats(channel), scrape(server)
  assert (st.running, st.waiting, st.paused, st.kv_usage) == (0, 0, 0, 0)
  assert gauge(m, "flying_num_requests_running") == 0
  assert gauge(m, "flying_num_requests_waiting") == 0
  assert gauge(m, "flying_num_requests_paused") == 0
  assert gauge(m, "flying_kv_cache_usage_perc") == 0
  assert gauge(m, "flying_partition_info", partition="8") == 1
  assert gauge(m, "flying_request_success_total", finished_reason="abort") >= 16, \
      [k for k in m if "success" in k]
  admin(channel).ReleasePartition(pb.ReleasePartitionRequest(), metadata=ADMIN)


def test_jetstream_health_still_live(channel):
  from flying_jax.serving.proto import jetstream_pb2_grpc as js_grpc
  assert js_grpc.OrchestratorStub(channel).HealthCheck(js.HealthCheckRequest()).is_live

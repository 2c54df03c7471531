"""The gRPC server with real clients on loopback (tiny model, 8 simulated devices).

One server runs for the module; the tests that drain it come last. Outputs are compared with
the engine driven directly, as the offline API drives it.
"""

import asyncio
import dataclasses
import json
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc
from flying_jax.serving.proto import jetstream_pb2 as js
from flying_jax.serving.proto import jetstream_pb2_grpc as js_grpc
from flying_jax.tokenizers import load_tokenizer
from grpc_helpers import running_server, code_of, no_leaks, offline, prompts

TOKEN = "s3cret"
ADMIN = [("authorization", f"Bearer {TOKEN}")]


@pytest.fixture(scope="module")
def engine():
  card = load_model_card("tiny")
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,),
                               prefill_chunks=(32,), token_budget=40, partitions=())
  return Engine(card, preset, EngineConfig(widths=(1, 8), width=1), tokenizer=load_tokenizer(card))


@pytest.fixture(scope="module")
def reference(engine):
  texts = prompts(64)
  return texts, offline(engine, texts)


@pytest.fixture(scope="module")
def server(engine, reference):
  with running_server(engine, TOKEN, {"flying-jax": "test"}) as th:
    yield th


@pytest.fixture(scope="module")
def channel(server):
  with grpc.insecure_channel(server.target) as ch:
    yield ch


def generate(channel, text, max_tokens=8, **kw):
  req = pb.GenerateRequest(text=text, sampling=pb.Sampling(temperature=0.0, max_tokens=max_tokens),
                           **kw)
  return list(pb_grpc.GenerationStub(channel).Generate(req, timeout=120))


# ---------------------------------------------------------------- serving
def test_streamed_output_equals_the_offline_run(channel, reference):
  texts, ref = reference
  for text, (ids, out_text) in list(zip(texts, ref))[:4]:
    resps = generate(channel, text)
    assert [t for r in resps for t in r.token_ids] == ids
    assert "".join(r.text for r in resps) == out_text
    assert all(len(r.token_ids) == 1 for r in resps)                # one token per step
    last = resps[-1]
    assert last.finish_reason == "length" and not any(r.finish_reason for r in resps[:-1])
    assert last.usage.completion_tokens == len(ids) and last.usage.prompt_tokens > 0
    assert 0 <= last.timings.time_to_first_token_s <= last.timings.elapsed_s


def test_64_concurrent_streams_are_correct_and_not_interleaved(server, reference):
  texts, ref = reference

  async def one(stub, i):
    req = pb.GenerateRequest(request_id=f"c-{i}", text=texts[i],
                             sampling=pb.Sampling(temperature=0.0, max_tokens=8))
    ids, rids = [], set()
    async for r in stub.Generate(req, timeout=300):
      ids += r.token_ids
      rids.add(r.request_id)
    return ids, rids

  async def all_of():
    async with grpc.aio.insecure_channel(server.target) as ch:
      stub = pb_grpc.GenerationStub(ch)
      return await asyncio.gather(*(one(stub, i) for i in range(64)))

  results = asyncio.run(all_of())
  for i, (ids, rids) in enumerate(results):
    assert rids == {f"c-{i}"}
    assert ids == ref[i][0], i
  assert no_leaks(server)


def test_jetstream_decode_streams_the_same_text(channel, reference):
  texts, ref = reference
  stub = js_grpc.OrchestratorStub(channel)
  resps = list(stub.Decode(js.DecodeRequest(
      max_tokens=8, text_content=js.DecodeRequest.TextContent(text=texts[5])), timeout=120))
  samples = [r.stream_content.samples for r in resps]
  assert all(len(s) == 1 for s in samples)
  assert [t for s in samples for t in s[0].token_ids] == ref[5][0]
  assert "".join(s[0].text for s in samples) == ref[5][1]
  # token ids in: token ids out, no text (JetStream's token mode)
  ids = load_tokenizer(load_model_card("tiny")).encode(texts[5])
  resps = list(stub.Decode(js.DecodeRequest(
      max_tokens=8, token_content=js.DecodeRequest.TokenContent(token_ids=ids)), timeout=120))
  assert [t for r in resps for t in r.stream_content.samples[0].token_ids] == ref[5][0]
  assert all(r.stream_content.samples[0].text == "" for r in resps)
  assert stub.HealthCheck(js.HealthCheckRequest()).is_live


def test_tokenize_detokenize_info_and_stats(channel, engine):
  stub = pb_grpc.GenerationStub(channel)
  ids = stub.Tokenize(pb.TokenizeRequest(text="w1 w2 w3")).token_ids
  assert list(ids) and stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == "w1 w2 w3"
  info = stub.GetServerInfo(pb.ServerInfoRequest())
  assert (info.model, info.mesh, info.devices) == ("tiny", "cpu-8", 8)
  assert list(info.partitions) == ["1x8", "8"] and info.versions["flying-jax"] == "test"
  stats = stub.GetStats(pb.StatsRequest())
  assert stats.partition == "1x8" and stats.steps > 0 and not stats.draining


def test_health_and_reflection(channel):
  health = health_pb2_grpc.HealthStub(channel)
  for service in ("", "flying_jax.v1.Generation", "jetstream_proto.Orchestrator"):
    assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
        health_pb2.HealthCheckResponse.SERVING
  services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
  assert {"flying_jax.v1.Generation", "flying_jax.v1.Admin", "jetstream_proto.Orchestrator",
          "grpc.health.v1.Health"} <= services


def test_metrics_endpoint(server, channel):
  generate(channel, "w1 w2", max_tokens=4)
  body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics",
                                timeout=10).read().decode()
  for name in ("flying_time_to_first_token_seconds_count", "flying_inter_token_latency_seconds",
               "flying_e2e_request_latency_seconds", "flying_request_queue_time_seconds",
               "flying_time_per_output_token_seconds", "flying_num_requests_running",
               "flying_num_requests_waiting", "flying_kv_cache_usage_perc",
               "flying_generation_tokens_total", "flying_prompt_tokens_total",
               'flying_partition_info{model_name="tiny",partition="1x8"} 1.0'):
    assert name in body, name
  ttft = [l for l in body.splitlines() if l.startswith("flying_time_to_first_token_seconds_count")]
  assert float(ttft[0].split()[-1]) > 0


def test_bench_and_bench_compare_against_the_server(server, channel, tmp_path, capsys):
  from flying_jax import cli

  out, png = tmp_path / "bench.json", tmp_path / "timeline.png"
  common = ["--target", server.target, "--requests", "8", "--rate", "50", "--input-len",
            "fixed:8", "--output-len", "fixed:4", "--priority-share", "0.5"]
  assert cli.main(["bench", *common, "--json", str(out), "--plot", str(png),
                   "--slo-ttft-ms", "60000"]) == 0
  (run,) = json.loads(out.read_text())["runs"].values()
  s = run["summary"]
  assert (s["completed"], s["failed"], s["output_tokens"]) == (8, 0, 32)
  assert s["goodput"] == pytest.approx(s["request_throughput"])
  assert len(run["requests"]) == 8 + 2 and sum(r["warmup"] for r in run["requests"]) == 2
  assert run["timeline"] and all(t["partition"] for t in run["timeline"])
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  assert "Successful requests:" in capsys.readouterr().out
  assert cli.main(["bench", "compare", *common, "--json", str(out)]) == 2       # no admin token
  assert cli.main(["bench", "compare", *common, "--admin-token", TOKEN, "--json", str(out)]) == 0
  runs = json.loads(out.read_text())["runs"]
  assert set(runs) == {"static DP", "static TP8", "auto"}
  assert all(r["summary"]["completed"] == 8 for r in runs.values())
  assert "auto vs DP" in capsys.readouterr().out
  pb_grpc.AdminStub(channel).SetPolicy(pb.SetPolicyRequest(policy=""), metadata=ADMIN)
  assert no_leaks(server)


# ---------------------------------------------------------------- bad input
def test_bad_requests_get_precise_statuses_and_disturb_nothing(channel, server, reference):
  stub = pb_grpc.GenerationStub(channel)
  bad = [
      (pb.GenerateRequest(text=""), "prompt is empty"),
      (pb.GenerateRequest(), "no prompt"),
      (pb.GenerateRequest(text="w1 " * 400), "at most 200"),
      (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**6])), "outside the vocabulary"),
      (pb.GenerateRequest(text="hi", sampling=pb.Sampling(temperature=-1)), "temperature"),
      (pb.GenerateRequest(text="hi", sampling=pb.Sampling(top_p=0)), "top_p"),
      (pb.GenerateRequest(text="hi", sampling=pb.Sampling(stop=[""])), "stop"),
      (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="x")])),
       "chat role"),
      (pb.GenerateRequest(text="hi", priority=-1), "priority"),
      (pb.GenerateRequest(text="hi", sampling=pb.Sampling(max_tokens=10**6)), "exceeds"),
  ]
  for req, match in bad:
    code, details = code_of(lambda: list(stub.Generate(req, timeout=30)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and match in details, (req, details)
  code, _ = code_of(lambda: list(stub.Generate(pb.GenerateRequest(text="w" * 100_000),
                                                 timeout=30)))
  assert code == grpc.StatusCode.RESOURCE_EXHAUSTED             # over the message size limit
  js_stub = js_grpc.OrchestratorStub(channel)
  code, details = code_of(lambda: list(js_stub.Decode(js.DecodeRequest(
      text_content=js.DecodeRequest.TextContent(text="hi"), lora_adapter_id="x"))))
  assert code == grpc.StatusCode.INVALID_ARGUMENT and "LoRA" in details
  # a full queue: RESOURCE_EXHAUSTED. The engine thread is held so that the first request waits
  # (queued, not stepped) when the second arrives; a request for more samples than the queue
  # can ever hold is INVALID_ARGUMENT
  loop = server.server.loop
  loop.max_waiting = 1
  held = threading.Event()
  try:
    loop.call(lambda e: held.wait(30))
    req = pb.GenerateRequest(text="w1", sampling=pb.Sampling(temperature=0.0, max_tokens=2))
    first = stub.Generate(req, timeout=60)
    time.sleep(0.3)
    second = stub.Generate(req, timeout=60)
    time.sleep(0.3)
    held.set()
    assert list(first)[-1].finish_reason == "length"
    code, details = code_of(lambda: list(second))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in details
    code, details = code_of(lambda: list(stub.Generate(pb.GenerateRequest(
        text="w1", sampling=pb.Sampling(n=2)), timeout=30)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "n=2 samples" in details
  finally:
    held.set()
    loop.max_waiting = 256
  assert no_leaks(server)
  texts, ref = reference
  assert [t for r in generate(channel, texts[0]) for t in r.token_ids] == ref[0][0]


def test_cancel_and_deadline_free_pages(channel, server):
  stub = pb_grpc.GenerationStub(channel)
  req = pb.GenerateRequest(text="w1 w2 w3", sampling=pb.Sampling(temperature=0.0, max_tokens=500,
                                                                 ignore_eos=True))
  call = stub.Generate(req, timeout=120)
  got = [next(call), next(call)]
  assert all(r.token_ids for r in got)
  call.cancel()
  assert no_leaks(server)
  code, _ = code_of(lambda: list(stub.Generate(req, timeout=0.5)))
  assert code == grpc.StatusCode.DEADLINE_EXCEEDED
  assert no_leaks(server)


# ---------------------------------------------------------------- admin
def test_admin_needs_the_token_and_pins_a_partition(channel, server):
  admin = pb_grpc.AdminStub(channel)
  code, _ = code_of(lambda: admin.PinPartition(pb.PinPartitionRequest(partition="8")))
  assert code == grpc.StatusCode.UNAUTHENTICATED
  code, _ = code_of(lambda: admin.PinPartition(pb.PinPartitionRequest(partition="8"),
                                               metadata=[("authorization", "Bearer wrong")]))
  assert code == grpc.StatusCode.PERMISSION_DENIED
  code, details = code_of(lambda: admin.PinPartition(pb.PinPartitionRequest(partition="2"),
                                                     metadata=ADMIN))
  assert code == grpc.StatusCode.INVALID_ARGUMENT and "not compiled" in details
  reply = admin.PinPartition(pb.PinPartitionRequest(partition="8", strategy="recompute"),
                             metadata=ADMIN)
  assert reply.stats.partition == "8" and reply.stats.policy == "static"
  assert generate(channel, "w4 w5", max_tokens=3)[-1].finish_reason == "length"
  reply = admin.ReleasePartition(pb.ReleasePartitionRequest(), metadata=ADMIN)
  assert reply.stats.policy == "none"
  reply = admin.SetPolicy(pb.SetPolicyRequest(policy="auto"), metadata=ADMIN)
  assert reply.stats.policy == "auto"
  code, _ = code_of(lambda: admin.SetPolicy(pb.SetPolicyRequest(policy="fastest"), metadata=ADMIN))
  assert code == grpc.StatusCode.INVALID_ARGUMENT
  admin.SetPolicy(pb.SetPolicyRequest(policy=""), metadata=ADMIN)
  admin.PinPartition(pb.PinPartitionRequest(partition="1", strategy="recompute"), metadata=ADMIN)
  admin.ReleasePartition(pb.ReleasePartitionRequest(), metadata=ADMIN)


# ---------------------------------------------------------------- last: draining
def test_drain_refuses_new_requests_and_health_goes_not_serving(channel, server):
  admin = pb_grpc.AdminStub(channel)
  reply = admin.Drain(pb.DrainRequest(), metadata=ADMIN)
  assert reply.stats.draining
  health = health_pb2_grpc.HealthStub(channel)
  assert health.Check(health_pb2.HealthCheckRequest()).status == \
      health_pb2.HealthCheckResponse.NOT_SERVING
  assert not js_grpc.OrchestratorStub(channel).HealthCheck(js.HealthCheckRequest()).is_live
  code, details = code_of(lambda: generate(channel, "w1"))
  assert code == grpc.StatusCode.FAILED_PRECONDITION and "draining" in details

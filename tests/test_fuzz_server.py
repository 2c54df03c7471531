"""A seeded fuzz of the running server: streams checked token for token against an offline
reference while bad, malformed and extreme requests, cancellation storms, 50 ms deadlines and an
admin client flipping the partition and the policy run beside them. Then, at idle: no page
leaked, every gauge back to zero, no drain pending.

Bounded (a fixed seed, ~400 streams of at most 64 tokens, tiny model) so it runs in `make test`.
"""

import asyncio
import dataclasses
import random
import time

import grpc
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc
from flying_jax.serving.proto import jetstream_pb2 as js
from flying_jax.serving.proto import jetstream_pb2_grpc as js_grpc
from flying_jax.tokenizers import load_tokenizer
from grpc_helpers import running_server, gauge, no_leaks, offline, prompts, scrape

SEED = 20261128
TOKEN = "fuzz"
ADMIN = [("authorization", f"Bearer {TOKEN}")]
MAX_TOKENS = 64
PARTITIONS = {"1": "1x8", "2": "2x4", "4": "4x2", "8": "8", "4+1x4": "4+1x4"}
STRATEGIES = ("drain", "pause", "recompute", "migrate")
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def engine():
  card = load_model_card("tiny")
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,),
                               prefill_chunks=(32,), token_budget=40, partitions=("4+1x4",))
  return Engine(card, preset, EngineConfig(widths=(1, 2, 4, 8), width=1, max_pause_s=1.0),
                tokenizer=load_tokenizer(card))


@pytest.fixture(scope="module")
def served(engine):
  texts = prompts(24, seed=SEED % 1000)
  ref = [ids for ids, _ in offline(engine, texts, max_tokens=MAX_TOKENS, ignore_eos=True)]
  with running_server(engine, TOKEN, max_waiting=4096) as th:
    yield th, texts, ref


def sampling(k, **kw):
  return pb.Sampling(temperature=0.0, max_tokens=k, ignore_eos=True, **kw)


# ---------------------------------------------------------------- the clients
class Tally:
  def __init__(self):
    self.outcomes: dict[str, int] = {}
    self.codes: dict[str, int] = {}

  def count(self, what: str):
    self.outcomes[what] = self.outcomes.get(what, 0) + 1


async def valid_stream(ch, i, rng, texts, ref, tally):
  """One good request; what it received must be the reference (or its prefix when cut short)."""
  await asyncio.sleep(rng.uniform(0, 8))
  p, k = rng.randrange(len(texts)), rng.randint(1, MAX_TOKENS)
  mode = rng.choice(["complete", "complete", "cancel", "deadline", "n2", "jetstream", "urgent",
                     "cancel-at-once"])
  want = ref[p][:k]
  if mode == "jetstream":
    call = js_grpc.OrchestratorStub(ch).Decode(js.DecodeRequest(
        max_tokens=k, text_content=js.DecodeRequest.TextContent(text=texts[p])), timeout=120)
    got = [t async for r in call for t in r.stream_content.samples[0].token_ids]
    assert got == want, (i, mode)                                 # greedy, no sampling fields
    return tally.count(mode)
  rid = f"fz-{i}"
  n = 2 if mode == "n2" else 1
  req = pb.GenerateRequest(request_id=rid, text=texts[p], sampling=sampling(k, n=n),
                           priority=1 if mode == "urgent" else 0)
  timeout = 0.05 if mode == "deadline" else 120
  call = pb_grpc.GenerationStub(ch).Generate(req, timeout=timeout)
  if mode == "cancel-at-once":
    call.cancel()
    return tally.count(mode)
  got, finished = [[] for _ in range(n)], [None] * n
  stop_after = rng.randint(1, k) if mode == "cancel" else None
  try:
    async for r in call:
      assert r.request_id == rid and finished[r.index] is None, (i, "after its finish")
      got[r.index] += r.token_ids
      if r.finish_reason:
        finished[r.index] = r.finish_reason
      if stop_after is not None and len(got[0]) >= stop_after:
        call.cancel()
        break
  except grpc.aio.AioRpcError as e:
    assert mode == "deadline" and e.code() == Code.DEADLINE_EXCEEDED, (i, mode, e.code())
  for ids in got:
    assert ids == want[:len(ids)], (i, mode)               # never a wrong token
  if all(finished):
    assert got == [want] * n and finished == ["length"] * n, (i, mode)
  else:
    assert mode in ("cancel", "deadline"), (i, mode, finished)
  tally.count(mode if all(finished) or mode != "deadline" else "deadline-hit")


def bad_requests():
  """(name, kind, request, the one status it must get)."""
  g = lambda **kw: ("gen", pb.GenerateRequest(**kw))
  s = lambda **kw: g(text="w1 w2", sampling=pb.Sampling(**kw))
  inv, big = Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED
  cases = [
      ("temperature inf", *s(temperature=float("inf")), inv),
      ("temperature nan", *s(temperature=float("nan")), inv),
      ("temperature -1", *s(temperature=-1.0), inv),
      ("top_p 0", *s(top_p=0.0), inv), ("top_p nan", *s(top_p=float("nan")), inv),
      ("top_k -5", *s(top_k=-5), inv), ("min_p 2", *s(min_p=2.0), inv),
      ("max_tokens -1", *s(max_tokens=-1), inv), ("max_tokens 1e9", *s(max_tokens=10**9), inv),
      ("logprobs 21", *s(logprobs=21), inv), ("presence 5", *s(presence_penalty=5.0), inv),
      ("repetition 0", *s(repetition_penalty=0.0), inv),
      ("repetition inf", *s(repetition_penalty=float("inf")), inv),
      ("stop ''", *s(stop=[""]), inv), ("stop id -1", *s(stop_token_ids=[-1]), inv),
      ("min > max", *s(min_tokens=9, max_tokens=3), inv),
      ("n beyond the queue", *s(n=10**6), inv),
      ("empty text", *g(text=""), inv), ("no prompt", *g(), inv),
      ("empty ids", *g(token_ids=pb.TokenIds(ids=[])), inv),
      ("negative id", *g(token_ids=pb.TokenIds(ids=[-1])), inv),
      ("id beyond vocab", *g(token_ids=pb.TokenIds(ids=[3, 10**9])), inv),
      ("bad chat role", *g(chat=pb.Chat(messages=[pb.ChatMessage(role="x", content="y")])), inv),
      ("empty chat", *g(chat=pb.Chat()), inv),
      ("priority -3", *g(text="w1", priority=-3), inv),
      ("too long", *g(text="w1 " * 300), inv),
      ("over the message limit", *g(text="w" * 100_000), big),
      ("duplicate id", *g(text="w1", request_id="fz-dup"), Code.OK),
  ]
  raw = {"invalid UTF-8": b"\x12\x0dhello \xff\xfe world", "overlong varint": b"\x08" + b"\xff" * 11,
         "corrupt": b"\xff\xff\xff", "truncated": b"\x12\x20hello"}
  cases += [(f"raw {k}", "raw", v, inv) for k, v in raw.items()]
  cases += [("detokenize beyond vocab", "detok", pb.DetokenizeRequest(token_ids=[10**6]), inv),
            ("jetstream LoRA", "js", js.DecodeRequest(
                text_content=js.DecodeRequest.TextContent(text="w1"), lora_adapter_id="a"), inv),
            ("jetstream no content", "js", js.DecodeRequest(), inv)]
  return cases


def mutated(rng) -> bytes:
  """A valid request's bytes with a few bytes changed, cut or inserted: OK or INVALID_ARGUMENT."""
  data = bytearray(pb.GenerateRequest(text="w1 w2 w3", sampling=sampling(4)).SerializeToString())
  for _ in range(rng.randint(1, 4)):
    op, at = rng.choice(["flip", "cut", "insert"]), rng.randrange(len(data))
    if op == "flip":
      data[at] = rng.randrange(256)
    elif op == "cut":
      del data[at:]
      if not data:
        data = bytearray(b"\x12")
    else:
      data.insert(at, rng.randrange(256))
  return bytes(data)


async def bad_request(ch, rng, name, kind, req, want, tally):
  await asyncio.sleep(rng.uniform(0, 8))
  stub = pb_grpc.GenerationStub(ch)
  timeout = 10 if want is None else 60
  try:
    if kind == "gen":
      [r async for r in stub.Generate(req, timeout=timeout)]
    elif kind == "raw":
      call = ch.unary_stream("/flying_jax.v1.Generation/Generate")
      [r async for r in call(req, timeout=timeout)]
    elif kind == "detok":
      await stub.Detokenize(req, timeout=timeout)
    else:
      [r async for r in js_grpc.OrchestratorStub(ch).Decode(req, timeout=timeout)]
    code = Code.OK
  except grpc.aio.AioRpcError as e:
    code = e.code()
  if want is None:
    # a mutated message may still parse into a valid (even long, or many-sampled) request: it
    # is served, refused or cut by its deadline, never a server fault
    assert code in (Code.OK, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED,
                    Code.DEADLINE_EXCEEDED), (name, code)
  else:
    assert code == want, (name, code)
  tally.codes[name] = code


async def admin_flips(ch, rng, stop: asyncio.Event, tally):
  """Every ~150 ms a pin, a policy or a refused call; each answer must match what happens."""
  adm, gen = pb_grpc.AdminStub(ch), pb_grpc.GenerationStub(ch)
  while not stop.is_set():
    await asyncio.sleep(rng.uniform(0.05, 0.25))
    action = rng.random()
    if action < 0.5:
      target, strategy = rng.choice(list(PARTITIONS)), rng.choice(STRATEGIES)
      try:
        reply = await adm.PinPartition(pb.PinPartitionRequest(partition=target,
                                                              strategy=strategy), metadata=ADMIN)
      except grpc.aio.AioRpcError as e:
        assert e.code() == Code.FAILED_PRECONDITION, (target, strategy, e.details())
        tally.count("pin refused")
        continue
      st = reply.stats
      assert st.policy == "static" and st.pinned_partition == target
      assert PARTITIONS[target] in (st.partition, st.pending_partition), (target, strategy, st)
      tally.count("pin")
    elif action < 0.7:
      before = await gen.GetStats(pb.StatsRequest())
      target, strategy = rng.choice([("2", "teleport"), ("3", "drain"), ("x", "pause"),
                                     ("1x2+3", "migrate")])
      with pytest.raises(grpc.aio.AioRpcError) as err:
        await adm.PinPartition(pb.PinPartitionRequest(partition=target, strategy=strategy),
                               metadata=ADMIN)
      assert err.value.code() == Code.INVALID_ARGUMENT
      after = await gen.GetStats(pb.StatsRequest())
      assert (after.policy, after.pinned_partition) == (before.policy, before.pinned_partition)
      tally.count("bad pin")
    elif action < 0.9:
      policy = rng.choice(["auto", "load", "priority", "static:2", "static:4+1x4", "none"])
      reply = await adm.SetPolicy(pb.SetPolicyRequest(policy=policy), metadata=ADMIN)
      assert reply.stats.policy == policy.split(":")[0]
      tally.count("policy")
    else:
      reply = await adm.ReleasePartition(pb.ReleasePartitionRequest(), metadata=ADMIN)
      assert reply.stats.pending_partition == ""
      tally.count("release")


async def guarded(coro, label: str, errors: list[str]):
  """Run one client; a failed check is recorded (all are reported together at the end)."""
  try:
    await coro
  except AssertionError as e:
    errors.append(f"{label}: {e}")
  except Exception as e:                      # a client error the checks did not expect
    errors.append(f"{label}: {type(e).__name__}: {e}")


async def fuzz(target, texts, ref, rng, tally) -> list[str]:
  errors: list[str] = []
  async with grpc.aio.insecure_channel(target) as ch:
    stop = asyncio.Event()
    flipper = asyncio.create_task(guarded(admin_flips(ch, random.Random(rng.random()), stop,
                                                      tally), "admin", errors))
    jobs = [guarded(valid_stream(ch, i, random.Random(rng.random()), texts, ref, tally),
                    f"stream {i}", errors) for i in range(400)]
    jobs += [guarded(bad_request(ch, random.Random(rng.random()), *case, tally), case[0], errors)
             for case in bad_requests()]
    jobs += [guarded(bad_request(ch, random.Random(rng.random()), f"mutation {j}", "raw",
                                 mutated(rng), None, tally), f"mutation {j}", errors)
             for j in range(30)]
    try:
      await asyncio.gather(*jobs)
    finally:
      stop.set()
      await flipper
    await pb_grpc.AdminStub(ch).SetPolicy(pb.SetPolicyRequest(policy=""), metadata=ADMIN)
  return errors


def test_fuzz_the_running_server(served):
  th, texts, ref = served
  tally = Tally()
  t0 = time.monotonic()
  errors = asyncio.run(fuzz(th.target, texts, ref, random.Random(SEED), tally))
  took = time.monotonic() - t0
  assert not errors, f"{len(errors)} failed checks: " + "; ".join(errors[:10])
  assert no_leaks(th, timeout_s=20), "KV pages or sequences left at idle"
  st = pb_grpc.GenerationStub(grpc.insecure_channel(th.target)).GetStats(pb.StatsRequest())
  assert (st.running, st.waiting, st.paused, st.kv_usage, st.pending_partition) == (0, 0, 0, 0, "")
  m = scrape(th)
  for name in ("flying_num_requests_running", "flying_num_requests_waiting",
               "flying_num_requests_paused", "flying_kv_cache_usage_perc",
               "flying_partition_pending_seconds"):
    assert gauge(m, name) == 0, name
  assert gauge(m, "flying_partition_info", partition=st.partition) == 1
  assert sum(v for k, v in m.items() if k.startswith("flying_partition_info{")) == 1
  assert all(v == 0 for k, v in m.items() if k.startswith("flying_partition_pending_info{"))
  # the run did exercise what it claims
  o = tally.outcomes
  assert o.get("complete", 0) > 20 and o.get("cancel", 0) > 5 and o.get("n2", 0) > 5
  assert o.get("pin", 0) > 5 and o.get("bad pin", 0) > 2 and o.get("policy", 0) > 2
  assert st.switches > 5
  print(f"fuzz: {took:.1f}s, outcomes {sorted(o.items())}, switches {st.switches}, "
        f"superseded drains {st.superseded_drains}")

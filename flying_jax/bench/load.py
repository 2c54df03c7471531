"""The load generator: send a workload's requests at their arrival times, record every token.

An asyncio client against flying-jax's gRPC `Generation` service, any server speaking
JetStream's `Orchestrator` contract, or any OpenAI-compatible HTTP server (streamed
`/v1/completions`, as vLLM's `benchmark_serving --backend openai` sends them). Optional cap on
requests in flight; warm-up requests go first and are excluded from the figures. Against
flying-jax's gRPC API it also samples `GetStats` during the run (queue depth, partition in force)
for the timeline plot. A shared prefix puts the same first tokens in front of every prompt (what
a prefix cache saves).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import grpc
import numpy as np

from flying_jax.bench.openai_client import HttpError, stream_events
from flying_jax.bench.report import RequestRecord
from flying_jax.bench.traces import Arrival
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc
from flying_jax.serving.proto import jetstream_pb2 as js
from flying_jax.serving.proto import jetstream_pb2_grpc as js_grpc


@dataclasses.dataclass
class Sample:
  t: float                  # seconds from the start of the run
  waiting: int
  running: int
  partition: str
  switches: int


@dataclasses.dataclass
class LoadResult:
  records: list[RequestRecord]
  timeline: list[Sample]
  arrivals: list[Arrival]


@dataclasses.dataclass(frozen=True)
class SharedPrefix:
  """The start every prompt shares: token ids in front of id prompts, `text` (the same ids
  decoded) in front of text prompts; None when no tokenizer was at hand to write it."""
  ids: tuple[int, ...]
  text: str | None = None


def shared_prefix(tokens: int, vocab: int, seed: int = 0, tokenizer=None) -> SharedPrefix | None:
  """`tokens` random ids (seeded, so runs compare), and their text when a tokenizer is given."""
  if tokens <= 0:
    return None
  ids = tuple(np.random.default_rng(seed + 7919).integers(0, vocab, size=tokens).tolist())
  return SharedPrefix(ids, tokenizer.decode(list(ids)) if tokenizer is not None else None)


def _with_prefix(arrivals: list[Arrival], ids: list[list[int]], prefix: SharedPrefix | None):
  if prefix is None:
    return arrivals, ids
  if prefix.text is None and any(a.prompt is not None for a in arrivals):
    raise ValueError("a shared prefix in front of text prompts (ShareGPT, a trace's prompts) "
                     "needs the model's tokenizer: leave out --target to start a server here")
  out = [dataclasses.replace(a, input_tokens=a.input_tokens + len(prefix.ids),
                             prompt=None if a.prompt is None else prefix.text + a.prompt)
         for a in arrivals]
  return out, [list(prefix.ids) + i for i in ids]


def _prompt_ids(a: Arrival, vocab: int, rng: np.random.Generator) -> list[int]:
  return rng.integers(0, vocab, size=max(1, a.input_tokens)).tolist()


def _flying_request(a: Arrival, ids) -> pb.GenerateRequest:
  s = pb.Sampling(temperature=0.0, max_tokens=max(1, a.output_tokens), ignore_eos=True)
  if a.prompt is not None:
    return pb.GenerateRequest(text=a.prompt, sampling=s, priority=a.priority)
  return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=s, priority=a.priority)


def _jetstream_request(a: Arrival, ids) -> js.DecodeRequest:
  if a.prompt is not None:
    return js.DecodeRequest(max_tokens=max(1, a.output_tokens),
                            text_content=js.DecodeRequest.TextContent(text=a.prompt))
  return js.DecodeRequest(max_tokens=max(1, a.output_tokens),
                          token_content=js.DecodeRequest.TokenContent(token_ids=ids))


@dataclasses.dataclass(frozen=True)
class OpenAITarget:
  """An OpenAI-compatible server: HOST:PORT, the model it serves, its API key."""
  address: str
  model: str
  api_key: str | None = None


def _openai_body(a: Arrival, ids, model: str) -> dict:
  """Greedy, EOS ignored, streamed with usage; `return_token_ids` (vLLM's) counts tokens exactly
  where a chunk's text holds none or several."""
  return {"model": model, "prompt": a.prompt if a.prompt is not None else ids,
          "max_tokens": max(1, a.output_tokens), "temperature": 0.0, "ignore_eos": True,
          "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}


async def _send_openai(target: OpenAITarget, a: Arrival, ids, rec: RequestRecord, t0: float):
  events = stream_events(target.address, "/v1/completions", _openai_body(a, ids, target.model),
                         target.api_key)
  async for event in events:
    now = time.perf_counter() - t0
    for c in event.get("choices") or []:
      n = len(c["token_ids"]) if c.get("token_ids") is not None else int(bool(c.get("text")))
      rec.token_times.extend([now] * n)


async def _send(channel, api: str, a: Arrival, ids, rec: RequestRecord, t0: float, timeout: float):
  if api == "openai":
    try:
      await asyncio.wait_for(_send_openai(channel, a, ids, rec, t0), timeout)
      rec.done = time.perf_counter() - t0
    except (HttpError, OSError, ValueError) as e:
      rec.error = str(e)
    except asyncio.TimeoutError:
      rec.error = f"deadline of {timeout:.0f} s exceeded"
    return
  try:
    if api == "jetstream":
      call = js_grpc.OrchestratorStub(channel).Decode(_jetstream_request(a, ids), timeout=timeout)
      async for r in call:
        now = time.perf_counter() - t0
        n = sum(len(s.token_ids) for s in r.stream_content.samples)
        rec.token_times.extend([now] * n)
    else:
      call = pb_grpc.GenerationStub(channel).Generate(_flying_request(a, ids), timeout=timeout)
      async for r in call:
        now = time.perf_counter() - t0
        rec.token_times.extend([now] * len(r.token_ids))
    rec.done = time.perf_counter() - t0
  except grpc.aio.AioRpcError as e:
    rec.error = f"{e.code().name}: {e.details()}"


async def _poll(channel, t0: float, out: list[Sample], stop: asyncio.Event, interval: float):
  stub = pb_grpc.GenerationStub(channel)
  while not stop.is_set():
    try:
      s = await stub.GetStats(pb.StatsRequest(), timeout=10)
      out.append(Sample(time.perf_counter() - t0, s.waiting, s.running, s.partition, s.switches))
    except grpc.aio.AioRpcError:
      pass
    try:
      await asyncio.wait_for(stop.wait(), interval)
    except asyncio.TimeoutError:
      pass


async def run_load(target: str, arrivals: list[Arrival], vocab: int, api: str = "flying",
                   max_concurrency: int | None = None, warmup: int = 0, timeout: float = 600.0,
                   seed: int = 0, poll_interval: float = 0.25, credentials=None,
                   openai: OpenAITarget | None = None,
                   prefix: SharedPrefix | None = None) -> LoadResult:
  """`api` "flying" or "jetstream" (gRPC at `target`) or "openai" (HTTP, `openai` says where)."""
  rng = np.random.default_rng(seed)
  ids = [_prompt_ids(a, vocab, rng) for a in arrivals]
  arrivals, ids = _with_prefix(arrivals, ids, prefix)
  opts = [("grpc.max_receive_message_length", 64 * 2**20)]
  if api == "openai":
    if openai is None:
      raise ValueError("the openai API needs its target (OpenAITarget)")
    channel = contextlib.nullcontext(openai)
  else:
    channel = (grpc.aio.secure_channel(target, credentials, options=opts) if credentials
               else grpc.aio.insecure_channel(target, options=opts))
  async with channel as channel:
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    for k in range(min(warmup, len(arrivals))):           # warm-up: sequential, not measured
      rec = RequestRecord(0.0, arrivals[k].input_tokens, arrivals[k].priority, warmup=True)
      await _send(channel, api, dataclasses.replace(arrivals[k], output_tokens=4), ids[k], rec,
                  t0, timeout)
      records.append(rec)
    timeline: list[Sample] = []
    stop = asyncio.Event()
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t0 = time.perf_counter()
    poller = asyncio.create_task(_poll(channel, t0, timeline, stop, poll_interval)) \
        if api == "flying" else None

    async def one(a: Arrival, prompt_ids):
      delay = a.at - (time.perf_counter() - t0)
      if delay > 0:
        await asyncio.sleep(delay)
      if gate is not None:
        await gate.acquire()
      rec = RequestRecord(time.perf_counter() - t0, a.input_tokens, a.priority)
      records.append(rec)
      try:
        await _send(channel, api, a, prompt_ids, rec, t0, timeout)
      finally:
        if gate is not None:
          gate.release()

    await asyncio.gather(*(one(a, i) for a, i in zip(arrivals, ids)))
    stop.set()
    if poller is not None:
      await poller
  return LoadResult(records, timeline, arrivals)

"""The load generator: send a workload's requests at their arrival times, record every token.

An asyncio gRPC client against flying-jax's `Generation` service or any server speaking
JetStream's `Orchestrator` contract. Optional cap on requests in flight; warm-up requests go
first and are excluded from the figures. Against flying-jax it also samples `GetStats` during
the run (queue depth, partition in force) for the timeline plot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import numpy as np

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


async def _send(channel, api: str, a: Arrival, ids, rec: RequestRecord, t0: float, timeout: float):
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
                   seed: int = 0, poll_interval: float = 0.25, credentials=None) -> LoadResult:
  rng = np.random.default_rng(seed)
  ids = [_prompt_ids(a, vocab, rng) for a in arrivals]
  opts = [("grpc.max_receive_message_length", 64 * 2**20)]
  channel = (grpc.aio.secure_channel(target, credentials, options=opts) if credentials
             else grpc.aio.insecure_channel(target, options=opts))
  async with channel:
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

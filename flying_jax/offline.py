"""The offline API, in the style users know from vLLM.

    from flying_jax import LLM, SamplingParams
    llm = LLM(model="smollm2-135m", mesh="cpu-8", width=2)
    outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Sequence as Seq

from flying_jax.config import default_mesh_name, load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine, RequestRejected
from flying_jax.engine.sequence import TokenLogprob
from flying_jax.engine.setup import EngineConfig
from flying_jax.parallel import Partition
from flying_jax.sampling import SamplingParams
from flying_jax.tokenizers import load_tokenizer


@dataclasses.dataclass
class CompletionOutput:
  index: int
  text: str
  token_ids: list[int]
  finish_reason: str | None
  stop_reason: int | str | None = None
  logprobs: list[TokenLogprob] | None = None


@dataclasses.dataclass
class RequestMetrics:
  arrival_time: float
  first_scheduled_time: float | None
  first_token_time: float | None
  finished_time: float | None

  @property
  def time_to_first_token(self) -> float | None:
    return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
  request_id: str
  prompt: str | None
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  finished: bool
  metrics: RequestMetrics


class LLM:
  """An engine on one mesh, with a tokenizer, for offline batch generation.

  `width` is the partition served (1 = data-parallel replicas); `widths` the widths compiled at
  start-up: by default only `width` when it is given, else all; `"all"` for every width the mesh
  allows. `partition` serves a mixed partition instead, e.g. `"4+1x4"` (a TP4 group beside four
  DP replicas; it must be listed in the mesh preset), compiling the widths it uses unless
  `widths` says more. `policy` picks the partition every step: `"static:W"`, `"load"`,
  `"priority"`, `"memory"` or `"auto"` (None: stay where it started). `attention`: the
  paged-attention backend, `"auto"` (Pallas kernels on GPUs and TPUs, the XLA reference on
  CPUs), `"pallas"` or `"xla"`. `overlap`: pack step n+1 while the device runs step n
  (`EngineConfig.overlap`). `cluster`: a `cluster.join.ClusterSpec` (or a joined `Cluster`) to
  run one engine over several processes; every process runs the same script: process 0's
  `generate` schedules and returns the outputs, the others' replay its dispatches and return the
  same outputs; `close()` (every process) ends it. `enable_prefix_caching` (vLLM's name, on by
  default): prompts that start with the same tokens share those KV pages (`kv.prefix`).
  """

  def __init__(self, model: str = "smollm2-135m", mesh: str | None = None, width: int | None = None,
               widths: Seq[int] | str | None = None, cache_dir: str | None = None,
               pages_per_device: int | None = None, progress: bool = True,
               policy: str | None = None, partition: str | None = None,
               attention: str = "auto", overlap: bool = True, cluster=None,
               enable_prefix_caching: bool = True):
    from flying_jax.cluster.join import ClusterSpec, join

    self.cluster = join(cluster) if isinstance(cluster, ClusterSpec) else cluster
    if self.cluster is not None and cache_dir is None:
      cache_dir = ""            # processes do not share one executable cache
    self.card = load_model_card(model)
    self.preset = load_mesh_preset(mesh or default_mesh_name())
    self.tokenizer = load_tokenizer(self.card)
    mixed = None
    if partition is not None:
      if width is not None:
        raise ValueError("give either width or partition, not both")
      part = Partition.parse(partition, self.preset.devices)
      width = part.uniform_width or part.name
      if part.uniform_width is None:
        mixed = (part.name,)
        if widths is None:
          widths = tuple(sorted(set(part.widths)))
    if widths == "all":
      widths = None                       # every width the mesh allows
    elif widths is None and isinstance(width, int):
      widths = (width,)
    config = EngineConfig(widths=tuple(widths) if widths else None, width=width,
                          pages_per_device=pages_per_device, progress=progress,
                          partitions=mixed if widths else None, attention=attention,
                          overlap=overlap, prefix_cache=enable_prefix_caching)
    if cache_dir is not None:                 # None: the default cache; "": no cache
      config = dataclasses.replace(config, cache_dir=cache_dir)
    self.engine = Engine(self.card, self.preset, config, tokenizer=self.tokenizer, policy=policy)
    self._ids = itertools.count()
    self._channel = None
    if self.cluster is not None:
      from flying_jax.cluster.lockstep import Channel, lead

      self._channel = Channel(self.cluster.process_id, self.cluster.processes)
      if self.cluster.leader:
        lead(self.engine, self._channel)

  @property
  def follower(self) -> bool:
    return self.cluster is not None and not self.cluster.leader

  def close(self):
    """End a cluster's engine (every process calls it: the leader tells the others to stop, they
    wait for it); nothing to do alone."""
    from flying_jax.cluster.lockstep import follow, stop

    if self._channel is None:
      return
    if self.follower:
      kind, _ = follow(self.engine, self._channel)
      if kind != "stop":
        raise RuntimeError(f"the leader sent {kind!r} where it should have stopped")
    else:
      stop(self._channel)
    self._channel = None

  @property
  def startup_report(self):
    return self.engine.report

  def encode(self, prompt: str | Seq[int] | dict, chat: bool) -> tuple[str | None, list[int]]:
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
      return None, [int(t) for t in prompt["prompt_token_ids"]]
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
      text = self.tokenizer.apply_chat_template(list(prompt))
      return text, self.tokenizer.encode_prompt(text)
    if not isinstance(prompt, str):
      raise TypeError(f"a prompt is a string, a chat message list or {{'prompt_token_ids': [...]}}, "
                      f"not {type(prompt).__name__}")
    if chat:
      prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return prompt, self.tokenizer.encode_prompt(prompt)

  def generate(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None,
               chat: bool = False, use_tqdm: bool = True) -> list[RequestOutput]:
    """Generate for every prompt; outputs come back in input order (in a cluster, on every
    process: the leader's)."""
    if self.follower:
      from flying_jax.cluster.lockstep import follow

      kind, outs = follow(self.engine, self._channel)
      if kind != "result":
        raise RuntimeError(f"the leader stopped (exit {outs}) instead of generating")
      if isinstance(outs, Exception):
        raise outs
      return outs
    try:
      outs = self._generate(prompts, params, chat, use_tqdm)
    except Exception as e:
      if self._channel is not None:                # the followers raise it too
        self._channel.publish(("result", RuntimeError(f"the leader's generate failed: {e}")))
      raise
    if self._channel is not None:
      self._channel.publish(("result", outs))
    return outs

  def _generate(self, prompts, params, chat: bool, use_tqdm: bool) -> list[RequestOutput]:
    if isinstance(prompts, (str, dict)):
      prompts = [prompts]
    params = params or SamplingParams()
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
      raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
    encoded = [self.encode(p, chat) for p in prompts]
    ids = []
    try:
      for (text, toks), p in zip(encoded, plist):
        rid = f"offline-{next(self._ids)}"
        self.engine.add_request(rid, toks, p)
        ids.append(rid)
    except RequestRejected:
      for rid in ids:
        self.engine.abort(rid)
      raise
    self._run(ids, use_tqdm)
    outs = [self._output(rid, text, toks) for rid, (text, toks) in zip(ids, encoded)]
    for rid in ids:
      self.engine.release(rid)
    return outs

  def chat(self, messages, params: SamplingParams | None = None, use_tqdm: bool = True):
    """One conversation (a list of {"role", "content"}) or a list of conversations."""
    convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    return self.generate(convs, params, use_tqdm=use_tqdm)

  def _run(self, ids: list[str], use_tqdm: bool):
    bar = None
    if use_tqdm and len(ids) > 1:
      from tqdm.auto import tqdm
      bar = tqdm(total=len(ids), desc="generating", unit="req")
    pending = set(ids)
    while pending:
      events = self.engine.step()
      if not events and not self.engine.has_unfinished():
        break
      if not events and not self.engine.scheduler.has_work():
        raise RuntimeError("only paused requests remain: switch back to their partition "
                           "(Engine.switch) to resume them")
      touched = {e.seq.request_id for e in events if e.finished} & pending
      done = {r for r in touched if all(s.finished for s in self.engine.request(r))}
      if bar is not None and done:
        bar.update(len(done))
      pending -= done
    if bar is not None:
      bar.close()

  def _output(self, rid: str, text: str | None, toks: list[int]) -> RequestOutput:
    seqs = self.engine.request(rid)
    outs = [CompletionOutput(s.index, s.text, list(s.output_ids), s.finish_reason, s.stop_reason,
                             list(s.logprobs) if s.params.logprobs is not None else None)
            for s in seqs]
    s0 = seqs[0]
    metrics = RequestMetrics(s0.arrival_time, s0.scheduled_time,
                             min((s.first_token_time or time.monotonic()) for s in seqs),
                             max((s.finish_time or 0.0) for s in seqs))
    return RequestOutput(rid, text, toks, outs, all(s.finished for s in seqs), metrics)

"""SmolLM2-135M-Instruct against the golden file, at every width, through one engine and the LLM API.

One `LLM` (the only one in the suite) is built on a copy of the cpu-8 preset with small buckets,
compiled for widths 1, 2, 4 and 8 and the preset's mixed partitions; its engine switches partition
between workloads.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from flying_jax import LLM
from flying_jax.config import MeshPreset, load_mesh_preset
from flying_jax.model.tables import spec_of
from flying_jax.model.weights import at
from flying_jax.sampling import SamplingParams
from flying_jax.presets.from_hf import toml_value
from helpers import captured_logits

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "smollm2-135m-instruct.json"
WIDTHS = (1, 2, 4, 8)
MIXED = ("4+1x4", "2x2+4")      # the cpu-8 preset's mixed partitions
EXTRA = ["Hello", "1, 2, 3,", "The sky is", "def add(a, b):"]
QUESTION = "What is the capital of France?"


def write_preset(path: Path, preset: MeshPreset):
  """A mesh preset as a flat TOML file (load_mesh_preset accepts the keys at top level)."""
  path.write_text("".join(f"{f.name} = {toml_value(getattr(preset, f.name))}\n"
                          for f in dataclasses.fields(preset)))


@pytest.fixture(scope="module")
def golden():
  return json.loads(GOLDEN.read_text())["cases"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), name="cpu-8-small", decode_buckets=(8,),
                               prefill_chunks=(32,), token_budget=40)
  path = tmp_path_factory.mktemp("mesh") / "cpu-8-small.toml"
  write_preset(path, preset)
  assert load_mesh_preset(str(path)) == preset
  return LLM(model="smollm2-135m", mesh=str(path), widths=WIDTHS, pages_per_device=64,
             progress=False)


@pytest.fixture(scope="module")
def runs(llm, golden):
  """Per width: {name: (output ids, text, logits of every step)} for the golden cases and EXTRA,
  all in one batch."""
  engine, tok = llm.engine, llm.tokenizer
  requests = {name: (c["prompt_ids"], len(c["greedy_ids"])) for name, c in golden.items()}
  requests.update({p: (tok.encode(p), 8) for p in EXTRA})
  out = {}
  for w in WIDTHS + MIXED:
    engine.set_width(w)
    with captured_logits(engine) as got:
      for i, (name, (ids, n)) in enumerate(requests.items()):
        # in a mixed partition, priority requests run in its wide group, the others beside it
        engine.add_request(f"w{w}-{name}", ids, SamplingParams(temperature=0.0, max_tokens=n),
                           priority=i % 2)
      while engine.has_unfinished():
        engine.step()
    out[w] = {}
    for name in requests:
      (seq,) = engine.request(f"w{w}-{name}")
      engine.release(f"w{w}-{name}")
      out[w][name] = (seq.output_ids, seq.text, np.stack(got[seq.seq_id]))
    assert engine.no_leaks()
  return out


def test_golden_prompt_ids(llm, golden):
  tok = llm.tokenizer
  for case in golden.values():
    prompt = case["prompt"]
    if prompt.startswith("<|im_start|>"):
      content = prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
      assert tok.apply_chat_template([{"role": "user", "content": content}]) == prompt
      assert llm.encode(content, chat=True) == (prompt, case["prompt_ids"])
    assert tok.encode(prompt) == case["prompt_ids"]


@pytest.mark.parametrize("width", WIDTHS + MIXED)
def test_golden_greedy_ids_and_logits(runs, golden, llm, width):
  for name, case in golden.items():
    ids, text, logits = runs[width][name]
    assert ids == case["greedy_ids"], f"{name} at width {width}"
    assert text == llm.tokenizer.decode(case["greedy_ids"])
    assert logits.shape == (len(ids), 49152)
    for i, step in enumerate(case["steps"]):
      np.testing.assert_allclose(logits[i, step["top_ids"]], step["top_logits"], rtol=0, atol=1e-2,
                                 err_msg=f"{name} step {i} at width {width}")


def test_widths_agree_on_other_prompts(runs):
  for p in EXTRA:
    ref_ids, ref_text, ref_logits = runs[1][p]
    assert len(ref_ids) == 8
    for w in WIDTHS[1:] + MIXED:
      ids, text, logits = runs[w][p]
      assert (ids, text) == (ref_ids, ref_text), f"{p!r} at width {w}"
      np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max(),
                                 err_msg=f"{p!r} at width {w}")


def test_llm_generate_and_chat(llm, runs):
  llm.engine.set_width(8)
  prompts = [QUESTION, "Name a color.", "What is 2+2?"]
  params = SamplingParams(temperature=0.0, max_tokens=8)
  outs = llm.generate(prompts, params, chat=True, use_tqdm=False)
  assert outs[0].outputs[0].text == "The capital of France is Paris."
  assert outs[0].outputs[0].finish_reason == "stop" and outs[0].outputs[0].stop_reason == 2
  assert len(outs) == len(prompts)
  for p, out in zip(prompts, outs):                        # in input order
    text, ids = llm.encode(p, chat=True)
    assert (out.prompt, out.prompt_token_ids) == (text, ids) and p in out.prompt
    assert out.finished and len(out.outputs) == 1 and 1 <= len(out.outputs[0].token_ids) <= 8
  assert len({o.request_id for o in outs}) == len(prompts)
  (chat,) = llm.chat([{"role": "user", "content": QUESTION}], params, use_tqdm=False)
  assert chat.outputs[0].text == outs[0].outputs[0].text
  assert chat.outputs[0].token_ids == outs[0].outputs[0].token_ids
  assert llm.engine.no_leaks()


def test_forced_switches_mid_generation_keep_greedy_ids(llm, runs, golden):
  """The real model, head padding and all: pause, recompute and migrate across every width."""
  engine = llm.engine
  engine.set_width(1)
  requests = {name: (c["prompt_ids"], len(c["greedy_ids"])) for name, c in golden.items()}
  requests.update({p: (llm.tokenizer.encode(p), 8) for p in EXTRA})
  for name, (ids, n) in requests.items():
    engine.add_request(f"sw-{name}", ids, SamplingParams(temperature=0.0, max_tokens=n))
  plan = [(4, "migrate"), ("4+1x4", "migrate"), (8, "migrate"), ("2+2+4", "pause"),
          (2, "pause"), (1, "recompute"), ("4+1x4", "recompute"), (8, "migrate"), (2, "migrate"),
          ("2+2+4", "migrate"), (1, "recompute")]
  pointers = engine.weights.buffer_pointers()
  step = 0
  while engine.has_unfinished():
    engine.step()
    step += 1
    if plan:
      engine.switch(*plan.pop(0), reason="test")
  assert not plan, "the switches did not all happen during generation"
  done = [r for r in engine.switches if r.reason == "test"][-11:]
  assert sum(r.migrated for r in done) > 0 and sum(r.recomputed for r in done) > 0
  for name in requests:
    (seq,) = engine.request(f"sw-{name}")
    engine.release(f"sw-{name}")
    assert seq.output_ids == runs[1][name][0], name
  assert engine.no_leaks() and engine.weights.buffer_pointers() == pointers


def test_grpc_stream_equals_the_offline_api(llm):
  """The real model over gRPC on loopback: the chat answer streams as LLM.chat returns it."""
  import grpc

  from flying_jax.serving.proto import flying_jax_pb2 as pb
  from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc
  from flying_jax.serving.server import ServeConfig, Server, ServerThread

  engine = llm.engine
  engine.set_width(1)
  params = SamplingParams(temperature=0.0, max_tokens=12)
  (offline,) = llm.chat([{"role": "user", "content": QUESTION}], params, use_tqdm=False)
  server = ServerThread(Server(engine, llm.tokenizer, ServeConfig(port=0)))
  try:
    with grpc.insecure_channel(server.target) as ch:
      req = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user",
                                                                     content=QUESTION)]),
                               sampling=pb.Sampling(temperature=0.0, max_tokens=12))
      resps = list(pb_grpc.GenerationStub(ch).Generate(req, timeout=300))
  finally:
    server.stop()
  assert "".join(r.text for r in resps) == offline.outputs[0].text == "The capital of France is Paris."
  assert [t for r in resps for t in r.token_ids] == offline.outputs[0].token_ids
  assert resps[-1].finish_reason == "stop" and resps[-1].stop_reason == "2"
  assert engine.no_leaks()


@pytest.fixture(scope="module")
def llm_tp2(tmp_path_factory):
  """Base width 2: four engines of two devices, each device half of every projection."""
  preset = dataclasses.replace(load_mesh_preset("cpu-8-tp2"), name="cpu-8-tp2-small",
                               decode_buckets=(8,), prefill_chunks=(32,), token_budget=40)
  path = tmp_path_factory.mktemp("mesh") / "cpu-8-tp2-small.toml"
  write_preset(path, preset)
  return LLM(model="smollm2-135m", mesh=str(path), widths=(2, 4, 8), pages_per_device=64,
             progress=False)


def test_golden_on_base_width_2(llm_tp2, golden):
  """Widths 2, 8 and the mixed 4+2x2 on engines of two devices: golden ids, logits within 1e-2;
  each device holds its engine's norms and half of the projections and embeddings. Width 4 is
  the mixed partition's TP4 group: every case runs there (priority) and on its TP2 engines at
  once, so one pass covers widths 4 and 2 side by side."""
  engine = llm_tp2.engine
  rep = engine.report
  split = sum(at(engine.weights.layers, spec_of(engine.card.arch, n).path).nbytes
              for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))   # every layer's
  split += engine.weights.embed["table"].nbytes                  # tied: the one table, split by vocabulary
  assert rep.device_weight_bytes == rep.weight_bytes - split // 2
  for w in (2, 8, "4+2x2"):
    engine.set_width(w)
    priorities = (0, 1) if w == "4+2x2" else (0,)     # 1: the TP4 group, 0: beside it
    with captured_logits(engine) as got:
      for name, c in golden.items():
        for p in priorities:
          engine.add_request(f"tp2-{w}-{name}-{p}", c["prompt_ids"],
                             SamplingParams(temperature=0.0, max_tokens=len(c["greedy_ids"])),
                             priority=p)
      while engine.has_unfinished():
        engine.step()
    for name, c in golden.items():
      for p in priorities:
        (seq,) = engine.request(f"tp2-{w}-{name}-{p}")
        engine.release(f"tp2-{w}-{name}-{p}")
        where = f"{name} at width {w}" + (f" (priority {p})" if len(priorities) > 1 else "")
        assert seq.layout.width == (w if isinstance(w, int) else 4 if p else 2), where
        assert seq.output_ids == c["greedy_ids"], where
        logits = np.stack(got[seq.seq_id])
        for i, step in enumerate(c["steps"]):
          np.testing.assert_allclose(logits[i, step["top_ids"]], step["top_logits"], rtol=0,
                                     atol=1e-2, err_msg=f"{where} step {i}")
  assert engine.no_leaks()

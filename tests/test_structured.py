"""Structured output: the device's token mask, llguidance's matchers, and SmolLM2-135M end to end.

The unit tests check the mask on small arrays (a masked sample never picks a forbidden id, on the
greedy and every sampling path; free rows are untouched). One `LLM` (SmolLM2-135M on cpu-8 with
small buckets, widths 1 and 8) then serves constrained requests beside a free one: outputs
satisfy their constraints, the free request is unchanged, greedy outputs agree across widths, a
switch mid-run and with masks computed before launch rather than deferred; bad constraints are
refused up front (and INVALID_ARGUMENT over gRPC); no page leaks.
"""

import dataclasses
import json
import re

import grpc
import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from flying_jax import LLM
from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import RequestRejected
from flying_jax.presets.from_hf import toml_value
from flying_jax.sampling import (RowSpec, SamplingParams, StructuredOutputsParams, mask_words,
                                 pack_sampling, sample)
from flying_jax.sampling.structured import Grammars, StructuredError
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc
from flying_jax.serving.requests import BadRequest, Limits, sampling_of
from flying_jax.tokenizers import load_tokenizer
from grpc_helpers import code_of, no_leaks, running_server

S = StructuredOutputsParams
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "maxLength": 16}}}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CASES = {   # name: (chat prompt, constraint, temperature)
    "json": ("Describe a person as JSON with name, age and city.", S(json=SCHEMA), 0.0),
    "regex": ("Give me a US phone number.", S(regex=PHONE), 0.0),
    "choice": ("Is Paris the capital of France? Answer yes or no.", S(choice=["yes", "no"]), 0.0),
    "json_object": ("Write a JSON object describing a cat.", S(json_object=True), 0.0),
    "free": ("What is the capital of France?", None, 0.0),
    "json_sampled": ("Describe a person as JSON.", S(json=SCHEMA), 0.8),
    "regex_sampled": ("Give me a phone number.", S(regex=PHONE), 0.8),
}
GREEDY = [k for k, (_, _, t) in CASES.items() if t == 0.0]


# ---------------------------------------------------------------- the device mask
def _masks(rng, rows, vocab, free=()):
  """Random masks of a few allowed ids per row (padding bits past `vocab` clear); -1 rows free."""
  words = mask_words(vocab)
  bits = np.zeros((rows, 32 * words), bool)
  for r in range(rows):
    bits[r, rng.choice(vocab, size=int(rng.integers(1, 6)), replace=False)] = True
  out = np.packbits(bits, axis=1, bitorder="little").view(np.int32).copy()
  out[list(free)] = -1
  return out, bits[:, :vocab]


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.9, 0.05),
    (2.0, 200, 0.5, 0.0)])
def test_a_masked_sample_never_picks_a_forbidden_id(temperature, top_k, top_p, min_p):
  rng = np.random.default_rng(0)
  rows, vocab = 6, 300                          # not a multiple of 32: a partly used last word
  params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
  fn = jax.jit(sample)
  for trial in range(8):
    logits = jnp.asarray(rng.normal(size=(rows, vocab)) * 3, jnp.float32)
    allowed, bits = _masks(rng, rows, vocab, free=(1, 4))
    batch = pack_sampling([RowSpec(params, seed=trial * 10 + i, step=trial) for i in range(rows)],
                          rows, 4, 2)
    got = np.asarray(fn(logits, batch, jnp.asarray(allowed)).tokens)
    free = np.asarray(fn(logits, batch, None).tokens)
    for r in range(rows):
      if r in (1, 4):
        assert got[r] == free[r]                # a free row samples as it would unmasked
      else:
        assert bits[r, got[r]], (trial, r, got[r])
        if temperature == 0.0:                  # greedy: the best allowed id
          allowed_ids = np.flatnonzero(bits[r])
          assert got[r] == allowed_ids[np.argmax(np.asarray(logits)[r, allowed_ids])]


def test_all_free_masks_change_nothing():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(5, 100)), jnp.float32)
  batch = pack_sampling([RowSpec(SamplingParams(temperature=1.0), seed=i, step=0)
                         for i in range(5)], 5, 4, 2)
  ones = jnp.full((5, mask_words(100)), -1, jnp.int32)
  a, b = jax.jit(sample)(logits, batch, ones), jax.jit(sample)(logits, batch)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_matchers_masks_and_refusals_on_the_byte_tokenizer():
  """The tiny model's byte tokenizer: ids 0..255 are bytes; the mask follows the regex, is cut
  or padded (with forbidden ids) to the model's width, and bad constraints say why."""
  g = Grammars(load_tokenizer(load_model_card("tiny")))
  m = g.matcher(S(regex=r"ab+"))
  wide = np.full((2, g.words + 3), -1, np.int32)
  g.fill([(m, 1)], wide)
  bits = np.unpackbits(wide[1].view(np.uint8), bitorder="little")
  assert np.flatnonzero(bits).tolist() == [ord("a")] and (wide[0] == -1).all()
  assert m.consume(ord("a")) and m.consume(ord("b")) and m.accepting and not m.done
  narrow = np.full((1, 4), -1, np.int32)               # a model vocabulary of 128 ids
  g.fill([(m, 0)], narrow)
  assert np.flatnonzero(np.unpackbits(narrow[0].view(np.uint8), bitorder="little")).tolist() \
      == [ord("b")]                                    # EOS (511) is past the model's ids
  for bad, words in ((S(regex="[0-9"), "unclosed"), (S(json={"type": "foo"}), "foo"),
                     (S(grammar="start: foo"), "unknown name")):
    with pytest.raises(StructuredError, match=words):
      g.compile(bad)
  choice = g.matcher(S(choice=['say "hi"', "x\\y"]))
  assert all(choice.consume(b) for b in b'x\\y') and choice.done


def test_a_sentencepiece_vocabulary_as_llguidance_sees_it():
  """Pieces as bytes ("▁" a space, <0xXX> a byte, control pieces special): the ids SentencePiece
  encodes a matching text to are each allowed in turn, and the match completes."""
  import io

  import sentencepiece

  from flying_jax.tokenizers.spm import SentencePieceTokenizer

  buf = io.BytesIO()
  corpus = ["hello world, the quick brown fox jumps over the lazy dog."] * 50
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=buf, vocab_size=320, hard_vocab_limit=False,
      model_type="bpe", byte_fallback=True, control_symbols=["[INST]"], minloglevel=2)
  tok = SentencePieceTokenizer.from_bytes(buf.getvalue())
  g = Grammars(tok)
  m = g.matcher(S(regex=r" ?hello wörld"))                # ö: byte-fallback pieces
  out = np.zeros((1, g.words), np.int32)
  for t in tok.encode("hello wörld"):
    g.fill([(m, 0)], out)
    assert (out[0, t // 32] >> (t % 32)) & 1, tok.id_to_token(t)
    assert m.consume(t)
  assert m.done
  inst = tok.token_to_id("[INST]")
  g.fill([(g.matcher(S(regex="(.|\\n)*")), 0)], out)
  assert not (out[0, inst // 32] >> (inst % 32)) & 1     # a control piece is never text


def test_requests_and_cli_map_the_constraint():
  limits = Limits(max_prompt_tokens=100)
  one = lambda **kw: sampling_of(pb.Sampling(structured=pb.StructuredOutput(**kw)), limits)
  assert one(regex="a+").structured_outputs == S(regex="a+")
  assert one(json_schema='{"type": "object"}').structured_outputs == S(json={"type": "object"})
  assert one(choice=pb.Choices(choices=["a", "b"])).structured_outputs == S(choice=("a", "b"))
  assert one(json_object=True).structured_outputs == S(json_object=True)
  assert sampling_of(pb.Sampling(), limits).structured_outputs is None
  for bad in (dict(), dict(json_object=False), dict(choice=pb.Choices()),
              dict(json_schema="{nope")):
    with pytest.raises(BadRequest, match="structured output"):
      one(**bad)
  from flying_jax.cli import build_parser
  from flying_jax.cli_generate import sampling_from_args
  args = build_parser().parse_args(["generate", "--choice", "a", "--choice", "b", "hi"])
  assert sampling_from_args(args).structured_outputs == S(choice=("a", "b"))
  args = build_parser().parse_args(["generate", "--json-schema", '{"type": "object"}', "hi"])
  assert sampling_from_args(args).structured_outputs == S(json={"type": "object"})


# ---------------------------------------------------------------- SmolLM2 end to end
@pytest.fixture(scope="module")
def llm(tmp_path_factory):
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), name="cpu-8-structured",
                               decode_buckets=(8,), prefill_chunks=(32,), token_budget=40,
                               partitions=())
  path = tmp_path_factory.mktemp("mesh") / "cpu-8-structured.toml"
  path.write_text("".join(f"{f.name} = {toml_value(getattr(preset, f.name))}\n"
                          for f in dataclasses.fields(preset)))
  return LLM(model="smollm2-135m", mesh=str(path), widths=(1, 8), width=1, pages_per_device=64,
             progress=False)


def run(llm, names, switch_at=None, **config):
  """The CASES `names` in one batch: {name: (ids, text, finish reason)}; `switch_at`: (step,
  width, strategy) of a switch mid-run; `config`: EngineConfig fields for this run."""
  engine, tok = llm.engine, llm.tokenizer
  saved = engine.config
  engine.config = dataclasses.replace(saved, **config)
  deferred = []
  sample = engine.executor.sample
  engine.executor.sample = lambda launched: deferred.append(1) or sample(launched)
  try:
    seqs = {}
    for name in names:
      prompt, so, temperature = CASES[name]
      ids = tok.encode_prompt(tok.apply_chat_template([{"role": "user", "content": prompt}]))
      params = SamplingParams(temperature=temperature, seed=7, max_tokens=40,
                              structured_outputs=so)
      (seqs[name],) = engine.add_request(f"{name}-{id(seqs)}", ids, params)
    step = 0
    while engine.has_unfinished():
      if switch_at is not None and step == switch_at[0]:
        engine.switch(switch_at[1], switch_at[2], reason="test")
      engine.step()
      step += 1
  finally:
    engine.config = saved
    del engine.executor.sample
  for s in seqs.values():
    engine.release(s.request_id)
    assert s.matcher is None                    # dropped when it finished
  assert engine.no_leaks()
  return {n: (s.output_ids, s.text, s.finish_reason) for n, s in seqs.items()}, len(deferred)


@pytest.fixture(scope="module")
def batch(llm):
  llm.engine.set_width(1)
  got, deferred = run(llm, list(CASES))
  assert deferred > 0                           # masks were made while step programs ran
  return got


def test_constrained_outputs_satisfy_their_constraints(batch):
  for name in ("json", "json_sampled"):
    ids, text, reason = batch[name]
    assert reason == "stop", (name, text)
    jsonschema.validate(json.loads(text), SCHEMA)
  for name in ("regex", "regex_sampled"):
    assert re.fullmatch(PHONE, batch[name][1]) and batch[name][2] == "stop", batch[name]
  assert batch["choice"][1] in ("yes", "no") and batch["choice"][2] == "stop"
  assert isinstance(json.loads(batch["json_object"][1]), dict)


def test_a_free_request_beside_them_is_unchanged(llm, batch):
  alone, deferred = run(llm, ["free"])
  assert alone["free"] == batch["free"] and deferred == 0


def test_greedy_outputs_agree_across_widths_a_switch_and_mask_timing(llm, batch):
  want = {n: batch[n] for n in GREEDY}
  llm.engine.set_width(8)
  try:
    assert run(llm, GREEDY)[0] == want                          # TP8 instead of DP
    assert run(llm, GREEDY, switch_at=(6, 1, "recompute"))[0] == want
  finally:
    llm.engine.set_width(1)
  assert run(llm, GREEDY, switch_at=(6, 8, "migrate"))[0] == want
  llm.engine.set_width(1)
  waited, deferred = run(llm, GREEDY, defer_masks=False)       # masks made before each launch
  assert waited == want and deferred == 0


def test_bad_constraints_are_refused_up_front(llm):
  engine = llm.engine
  for so, words in ((S(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "nope"),
                    (S(regex="(unclosed"), "regex"), (S(grammar="start: missing"), "missing")):
    with pytest.raises(RequestRejected, match=words):
      engine.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs=so))
  engine.executor.mirror = lambda message: None     # as when leading processes (`cluster`)
  try:
    with pytest.raises(RequestRejected, match="across processes"):
      engine.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs=S(regex="a")))
  finally:
    engine.executor.mirror = None
  assert engine.no_leaks()


def test_grpc_structured_request_and_invalid_argument(llm):
  engine = llm.engine
  with running_server(engine, "token") as server, grpc.insecure_channel(server.target) as ch:
    stub = pb_grpc.GenerationStub(ch)
    sampling = lambda **kw: pb.Sampling(temperature=0.0, max_tokens=20,
                                        structured=pb.StructuredOutput(**kw))
    resps = list(stub.Generate(pb.GenerateRequest(text="My phone number is",
                                                  sampling=sampling(regex=PHONE)), timeout=300))
    assert re.fullmatch(PHONE, "".join(r.text for r in resps))
    assert resps[-1].finish_reason == "stop"
    code, details = code_of(lambda: list(stub.Generate(pb.GenerateRequest(
        text="hi", sampling=sampling(regex="[a-")), timeout=60)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "regex" in details
    code, details = code_of(lambda: list(stub.Generate(pb.GenerateRequest(
        text="hi", sampling=sampling(json_object=False)), timeout=60)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "structured output" in details
    assert no_leaks(server)


def test_openai_api_response_format_and_structured_outputs(llm):
  """The OpenAI API's response_format (JSON Schema) and vLLM's structured_outputs (regex), with
  the official client: enforced as through the offline API; a schema that does not compile is
  a 400 with llguidance's reason."""
  import openai

  with running_server(llm.engine, "token", http_port=0, max_prompt_tokens=400) as server:
    client = openai.OpenAI(base_url=f"http://{server.http_target}/v1", api_key="none")
    reply = client.chat.completions.create(
        model="smollm2-135m", max_completion_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Describe a person as JSON with name, age and city."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": SCHEMA}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    assert reply.choices[0].finish_reason == "stop"
    done = client.completions.create(model="smollm2-135m", prompt="My phone number is",
                                     max_tokens=20, temperature=0,
                                     extra_body={"structured_outputs": {"regex": PHONE}})
    assert re.fullmatch(PHONE, done.choices[0].text)
    with pytest.raises(openai.BadRequestError) as bad:
      client.completions.create(model="smollm2-135m", prompt="hi", max_tokens=4,
                                extra_body={"structured_outputs": {"regex": "[a-"}})
    assert "regex" in str(bad.value)
    assert no_leaks(server)

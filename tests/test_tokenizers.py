"""Tokenizers: golden SmolLM2 ids, round trips for every backend, chat templates, streaming text."""

import dataclasses
import io
import json
from pathlib import Path

import gguf
import pytest
import sentencepiece

from flying_jax.config import ModelCard, TokenizerSpec, WeightsSource, load_model_card
from flying_jax.tokenizers import (IncrementalDetokenizer, TokenizerError, find_stop,
                                   load_tokenizer, partial_stop_len, render_chat, resolve_gguf_path)
from flying_jax.tokenizers import bpe_gguf, chat

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "smollm2-135m-instruct.json"
TEXTS = [
    "Hello, world!",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Zahlen 1234567890 und Umlaute äöüß, ça va?",
    "日本語のテキストと中文",
    "emoji 😀 🎉 👩‍👩‍👧 🇫🇷 flags",
    "<|im_start|>user\nhi<|im_end|>",
]
SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Zahlen 1234567890 und Umlaute äöüß, ça va?",
    "[INST] what is the capital of France? [/INST] Paris.",
    "leading spaces, tabs and newlines",
]


def _card(kind: str, path=None, **tokenizer) -> ModelCard:
  card = load_model_card("tiny")
  spec = TokenizerSpec(kind=kind, path=None if path is None else str(path), **tokenizer)
  return dataclasses.replace(card, tokenizer=spec)


@pytest.fixture(scope="module")
def smol():
  return load_tokenizer(load_model_card("smollm2-135m"))


@pytest.fixture(scope="module")
def golden():
  return json.loads(GOLDEN.read_text())["cases"]["chat_france"]


@pytest.fixture(scope="module")
def spm_model() -> bytes:
  """A tiny BPE SentencePiece model with byte fallback, no normalization and `[INST]` as a control
  piece (Llama-2 style)."""
  buf = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(SPM_CORPUS * 20), model_writer=buf, vocab_size=400,
      hard_vocab_limit=False, model_type="bpe", byte_fallback=True, character_coverage=1.0,
      control_symbols=["[INST]", "[/INST]"], normalization_rule_name="identity",
      remove_extra_whitespaces=False, minloglevel=2)   # as Llama-2's model
  return buf.getvalue()


@pytest.fixture(scope="module")
def spm_tok(spm_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
  path.write_bytes(spm_model)
  return load_tokenizer(_card("sentencepiece", path, chat_template="llama2"))


# ---------------------------------------------------------------- GGUF byte-level BPE (SmolLM2)


def test_smollm2_golden_prompt_ids(smol, golden):
  assert smol.encode(golden["prompt"]) == golden["prompt_ids"]
  assert smol.encode(golden["prompt"], add_bos=True) == golden["prompt_ids"]   # no BOS here
  chat_prompt = smol.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France?"}])
  assert chat_prompt == golden["prompt"]


def test_smollm2_golden_decode(smol, golden):
  assert smol.decode([504, 3575, 282, 4649, 314, 7042, 30]) == "The capital of France is Paris."
  assert smol.decode(golden["greedy_ids"]) == "The capital of France is Paris."
  assert smol.decode(golden["greedy_ids"], skip_special=False) == golden["greedy_text"]


def test_smollm2_specials(smol):
  assert smol.vocab_size == 49152 and smol.bos_id is None and smol.eos_ids == (2, 0)
  assert smol.special_ids == frozenset(range(17))
  assert smol.id_to_token(2) == "<|im_end|>" and smol.token_to_id("<|endoftext|>") == 0
  assert smol.id_to_token(10**6) is None
  assert smol.decode([504, 10**6, 30]) == "The."   # out-of-vocabulary ids are dropped
  assert smol.encode("2024") == [34, 32, 34, 36]   # digits one by one


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_round_trip(smol, text):
  assert smol.decode(smol.encode(text), skip_special=False) == text


def test_gguf_metadata_reader_matches_gguf_package(tmp_path):
  for endian in (gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG):
    path = tmp_path / f"t{endian.value}.gguf"
    w = gguf.GGUFWriter(path, "llama", endianess=endian)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", "é", "<x>"])
    w.add_token_types([1, 1, 1, 1, 3])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(4)
    w.add_add_bos_token(True)
    w.add_float32("tokenizer.f32", 0.5)
    w.add_int64("tokenizer.i64", -5)
    w.add_array("tokenizer.f64s", [1.5, 2.5])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    ref = gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in ref.fields.items() if k.startswith("tokenizer.")}
    assert bpe_gguf.read_tokenizer_metadata(path) == want
    tok = load_tokenizer(_card("gguf"), gguf_path=path)
    assert tok.bos_id == 4 and tok.eos_ids == () and tok.special_ids == {4}
    assert tok.encode("ab<x>a", add_bos=True) == [4, 2, 4, 0]


def test_gguf_path_resolution(tmp_path, smol):
  card = load_model_card("smollm2-135m")
  path = resolve_gguf_path(card)
  assert path.is_file() and path.name == card.weights.file
  by_path = dataclasses.replace(card, weights=WeightsSource(format="gguf", path=str(path)))
  assert load_tokenizer(by_path).encode(TEXTS[2]) == smol.encode(TEXTS[2])
  missing = dataclasses.replace(card, weights=WeightsSource(format="gguf", package="no_such_pkg_x",
                                                            file="m.gguf"))
  with pytest.raises(FileNotFoundError, match="no_such_pkg_x"):
    load_tokenizer(missing)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(card, gguf_path=tmp_path / "absent.gguf")
  with pytest.raises(TokenizerError, match="GGUF file"):
    load_tokenizer(_card("gguf"))   # random weights and no gguf_path
  for name, data in [("empty", b""), ("magic", b"NOPE" + bytes(32)),
                     ("truncated", b"GGUF\x03\0\0\0" + bytes(8) + b"\x05" + bytes(15))]:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(TokenizerError, match="GGUF"):
      load_tokenizer(card, gguf_path=tmp_path / name)


def test_gguf_unsupported_tokenizer(tmp_path):
  cases = [("t5", "t5", "default"), ("bpe", "gpt2", "qwen2"), ("none", None, None)]
  for name, model, pre in cases:
    w = gguf.GGUFWriter(tmp_path / name, "llama")
    if model:
      w.add_tokenizer_model(model)
      w.add_tokenizer_pre(pre)
      w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
  for name, match in [("t5", "'t5' is not supported"), ("bpe", "pre-tokenizer 'qwen2'"),
                      ("none", "holds no tokenizer")]:
    with pytest.raises(TokenizerError, match=match):
      load_tokenizer(_card("gguf"), gguf_path=tmp_path / name)


def test_load_errors(tmp_path):
  with pytest.raises(TokenizerError, match="unknown tokenizer kind 'wordpiece'"):
    load_tokenizer(_card("wordpiece"))
  for kind in ("sentencepiece", "tokenizer.json"):
    with pytest.raises(FileNotFoundError, match="absent.model"):
      load_tokenizer(_card(kind, tmp_path / "absent.model"))
    with pytest.raises(TokenizerError, match="no path given"):
      load_tokenizer(_card(kind))


# ---------------------------------------------------------------- tokenizer.json


def test_tokenizer_json_matches_gguf(smol, tmp_path):
  path = tmp_path / "tokenizer.json"
  smol.save(path)
  tok = load_tokenizer(_card("tokenizer.json", path, stop_ids=[2, 0], chat_template="chatml"))
  assert tok.vocab_size == smol.vocab_size and tok.special_ids == smol.special_ids
  assert tok.bos_id is None and tok.eos_ids == (2, 0)
  for text in TEXTS:
    ids = smol.encode(text)
    assert tok.encode(text) == ids
    assert tok.decode(ids) == smol.decode(ids)
    assert tok.decode(ids, skip_special=False) == text


def test_tokenizer_json_bos_from_post_processor(smol, tmp_path):
  from tokenizers import processors

  smol.hf.post_processor = processors.TemplateProcessing(
      single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
  try:
    smol.save(tmp_path / "tokenizer.json")
  finally:
    smol.hf.post_processor = None
  tok = load_tokenizer(_card("tokenizer.json", tmp_path / "tokenizer.json"))
  assert tok.bos_id == 0
  assert tok.encode("hi", add_bos=True) == [0, *smol.encode("hi")]
  assert tok.encode("hi") == smol.encode("hi")


# ---------------------------------------------------------------- SentencePiece


@pytest.mark.parametrize("text", TEXTS[:5])
def test_sentencepiece_round_trip(spm_tok, spm_model, text):
  sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
  assert spm_tok.encode(text) == sp.encode(text)
  assert spm_tok.decode(spm_tok.encode(text)) == text


def test_sentencepiece_specials_and_llama2_chat(spm_tok):
  bos, eos = spm_tok.bos_id, spm_tok.eos_ids[0]
  inst, end_inst = spm_tok.token_to_id("[INST]"), spm_tok.token_to_id("[/INST]")
  assert (bos, eos) == (1, 2) and {bos, eos, inst, end_inst} <= spm_tok.special_ids
  assert spm_tok.token_to_id("no such piece") is None
  assert spm_tok.encode("hi", add_bos=True)[0] == bos
  prompt = spm_tok.apply_chat_template([
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Capital of France?"},
      {"role": "assistant", "content": "Paris."},
      {"role": "user", "content": "And Italy?"}])
  assert prompt == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nCapital of France? [/INST] "
                    "Paris. </s><s>[INST] And Italy? [/INST]")
  ids = spm_tok.encode(prompt)
  assert ids[:2] == [bos, inst] and ids[-1] == end_inst and ids.count(bos) == 2
  assert ids.count(eos) == 1
  assert spm_tok.decode(ids, skip_special=False) == prompt
  assert "[INST]" not in spm_tok.decode(ids)


# ---------------------------------------------------------------- bytes


def test_bytes_tokenizer():
  tok = load_tokenizer(load_model_card("tiny"))
  assert tok.vocab_size == 512 and tok.bos_id is None and tok.eos_ids == ()
  for text in TEXTS:
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text)) == text
  assert tok.decode([104, 300, 105, 511]) == "hi"
  assert tok.decode([0xF0, 0x9F, 104]) == "\ufffdh"
  assert tok.id_to_token(65) == "<0x41>" and tok.token_to_id("<0x41>") == 65


# ---------------------------------------------------------------- chat templates


def test_chatml_render():
  msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
          {"role": "assistant", "content": "A"}]
  want = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
          "<|im_start|>assistant\nA<|im_end|>\n")
  assert render_chat("chatml", msgs, add_generation_prompt=False) == want
  assert render_chat("chatml", msgs) == want + "<|im_start|>assistant\n"


def test_gemma_render():
  """Gemma's turns (HF's template for Gemma 3 IT): assistant as `model`, the system message
  folded into the first user turn."""
  msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
          {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
  want = ("<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
          "<start_of_turn>user\nV<end_of_turn>\n")
  assert render_chat("gemma", msgs, add_generation_prompt=False) == want
  assert render_chat("gemma", msgs) == want + "<start_of_turn>model\n"
  with pytest.raises(ValueError, match="system message may only come first"):
    render_chat("gemma", [{"role": "user", "content": "U"}, {"role": "system", "content": "S"}])


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ("hello", "list"),
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ([{"role": "user"}], "content must be a string"),
    (["hi"], "must be a dict"),
])
def test_chat_validation(messages, match):
  with pytest.raises(ValueError, match=match):
    render_chat("chatml", messages)


def test_chat_errors():
  with pytest.raises(ValueError, match="unknown chat template"):
    render_chat("vicuna", [{"role": "user", "content": "x"}])
  with pytest.raises(ValueError, match="must be 'user'"):
    chat.llama2([{"role": "assistant", "content": "x"}])
  with pytest.raises(TokenizerError, match="no chat template"):
    load_tokenizer(load_model_card("tiny")).apply_chat_template([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------- streaming


def _stream(tok, ids, prompt_ids=None, chunk=1):
  detok = IncrementalDetokenizer(tok, prompt_ids)
  pieces = [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
  pieces.append(detok.flush())
  assert "".join(pieces) == detok.text
  return pieces


@pytest.mark.parametrize("backend", ["gguf", "spm", "bytes"])
def test_incremental_detokenizer(backend, smol, spm_tok):
  tok = {"gguf": smol, "spm": spm_tok, "bytes": load_tokenizer(load_model_card("tiny"))}[backend]
  for text in TEXTS[:5]:
    ids = tok.encode(text)
    for chunk in (1, 3):
      pieces = _stream(tok, ids, chunk=chunk)
      assert "".join(pieces) == tok.decode(ids)
      assert not any("\ufffd" in p for p in pieces)
    prompt = tok.encode("Prompt: ")
    want = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert "".join(_stream(tok, ids, prompt_ids=prompt)) == want


def test_incremental_detokenizer_holds_partial_character(smol):
  ids = smol.encode("😀")
  assert len(ids) > 1
  detok = IncrementalDetokenizer(smol)
  assert [detok.push(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
  assert detok.generated_ids == ids and detok.flush() == ""


def test_incremental_detokenizer_skips_specials(smol, golden):
  pieces = _stream(smol, golden["greedy_ids"])
  assert "".join(pieces) == "The capital of France is Paris."


def test_find_stop_straddles_pushes():
  text = ""
  for piece, want in [("Hello wo", -1), ("rld, ST", -1), ("OP here", 13)]:
    start, text = len(text), text + piece
    assert find_stop(text, ["STOP", "world!"], start) == want
  assert find_stop("a world b", ["world", "a w"], 0) == 0
  assert find_stop("abc", [], 0) == -1 and find_stop("abc", [""], 0) == -1
  assert partial_stop_len("Hello ST", ["STOP"]) == 2
  assert partial_stop_len("Hello", ["STOP", "lo!"]) == 2
  assert partial_stop_len("Hello", ["xyz"]) == 0

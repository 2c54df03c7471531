"""The OpenAI-compatible HTTP API with the official `openai` client (tiny model, 8 simulated
devices).

One server, gRPC and HTTP on one engine, runs for the module; the test that drains it comes
last. The engine is an offline `flying_jax.LLM`'s, whose greedy answers (taken before the server
owns it) are what both APIs must give, token for token. The tiny card gets the chatml template so
that chat completions have one. Request parsing alone: tests/test_openai_protocol.py.
"""

import asyncio
import concurrent.futures
import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from flying_jax import LLM
from flying_jax.config import load_mesh_preset
from flying_jax.sampling import SamplingParams
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc
from grpc_helpers import gauge, no_leaks, prompts, running_server, scrape
from test_smollm2 import write_preset

ROOT = Path(__file__).resolve().parents[1]
TOKEN, KEY = "adm1n", "sk-test"
GREEDY = dict(temperature=0.0, max_tokens=8)
AS_IDS = {"return_tokens_as_token_ids": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
  folder = tmp_path_factory.mktemp("openai")
  card = folder / "tiny.toml"
  card.write_text((ROOT / "models" / "tiny.toml").read_text().replace(
      "[tokenizer]\n", '[tokenizer]\nchat_template = "chatml"\n'))
  mesh = folder / "cpu-8-small.toml"
  write_preset(mesh, dataclasses.replace(load_mesh_preset("cpu-8"), name="cpu-8-small",
                                         decode_buckets=(8,), prefill_chunks=(32,),
                                         token_budget=40, partitions=()))
  return LLM(model=str(card), mesh=str(mesh), widths=(1, 8), width=1, progress=False)


@pytest.fixture(scope="module")
def reference(llm):
  """Greedy ids and texts of the offline API, before the server owns the engine."""
  texts = prompts(8, seed=3)
  outs = llm.generate(texts, SamplingParams(**GREEDY), use_tqdm=False)
  (chat,) = llm.chat([{"role": "user", "content": texts[0]}], SamplingParams(**GREEDY),
                     use_tqdm=False)
  return texts, [(o.outputs[0].token_ids, o.outputs[0].text) for o in outs], \
      (chat.outputs[0].token_ids, chat.outputs[0].text)


@pytest.fixture(scope="module")
def server(llm, reference):
  with running_server(llm.engine, TOKEN, {"flying-jax": "test"}, http_port=0,
                      api_key=KEY) as th:
    yield th


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"http://{server.http_target}/v1", api_key=KEY, max_retries=0,
                       timeout=120)


def http(server, path, body=None, token=KEY, raw=None):
  """(status, parsed JSON or text) of one plain HTTP call: GET, or POST of `body` (or `raw`)."""
  data = raw if raw is not None else None if body is None else json.dumps(body).encode()
  headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"}
                                                     if token else {})
  req = urllib.request.Request(f"http://{server.http_target}{path}", data=data, headers=headers)
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      status, text = r.status, r.read().decode()
  except urllib.error.HTTPError as e:
    status, text = e.code, e.read().decode()
  try:
    return status, json.loads(text)
  except ValueError:
    return status, text


def ids_of(logprobs_tokens) -> list[int]:
  return [int(t.removeprefix("token_id:")) for t in logprobs_tokens]


def refused(call) -> openai.APIStatusError:
  with pytest.raises(openai.APIStatusError) as err:
    call()
  body = err.value.body
  assert set(body) == {"message", "type", "param", "code"}, body       # OpenAI's error shape
  return err.value


# ---------------------------------------------------------------- the same tokens everywhere
def test_completions_equal_grpc_and_offline(server, client, reference):
  texts, ref, _ = reference
  with grpc.insecure_channel(server.target) as ch:
    stub = pb_grpc.GenerationStub(ch)
    for text, (ids, out_text) in list(zip(texts, ref))[:3]:
      got = client.completions.create(model="tiny", prompt=text, logprobs=1, extra_body=AS_IDS,
                                      **GREEDY)
      (c,) = got.choices
      assert ids_of(c.logprobs.tokens) == ids and c.model_extra["token_ids"] == ids
      assert c.text == out_text and c.finish_reason == "length"
      assert len(c.logprobs.top_logprobs[0]) == 1 and c.logprobs.text_offset[0] == 0
      assert got.usage.completion_tokens == 8 and got.usage.prompt_tokens == len(text)
      assert got.usage.prompt_tokens_details.cached_tokens >= 0
      streamed = list(client.completions.create(model="tiny", prompt=text, stream=True,
                                                extra_body=AS_IDS, **GREEDY))
      assert [t for ch_ in streamed for t in ch_.choices[0].model_extra["token_ids"]] == ids
      assert "".join(ch_.choices[0].text for ch_ in streamed) == out_text
      assert streamed[-1].choices[0].finish_reason == "length"
      grpc_ids = [t for r in stub.Generate(pb.GenerateRequest(
          text=text, sampling=pb.Sampling(temperature=0.0, max_tokens=8)), timeout=120)
          for t in r.token_ids]
      assert grpc_ids == ids


def test_chat_equals_offline_chat(client, reference):
  texts, _, (ids, text) = reference
  messages = [{"role": "user", "content": texts[0]}]
  got = client.chat.completions.create(model="tiny", messages=messages, logprobs=True,
                                       top_logprobs=2, extra_body=AS_IDS, **GREEDY)
  (c,) = got.choices
  assert ids_of(e.token for e in c.logprobs.content) == ids == c.model_extra["token_ids"]
  assert all(len(e.top_logprobs) == 2 for e in c.logprobs.content)
  assert c.message.role == "assistant" and c.message.content == text
  chunks = list(client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": texts[0]}]}],
      stream=True, max_completion_tokens=8, temperature=0.0))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
  assert chunks[-1].choices[0].finish_reason == "length"
  assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)


def test_async_client_concurrent_requests(server, reference):
  texts, ref, _ = reference

  async def one(c, i):
    if i % 2:
      got = await c.completions.create(model="tiny", prompt=texts[i], extra_body=AS_IDS,
                                       **GREEDY)
      return got.choices[0].model_extra["token_ids"]
    ids = []
    async for ch in await c.completions.create(model="tiny", prompt=texts[i], stream=True,
                                               extra_body=AS_IDS, **GREEDY):
      ids += ch.choices[0].model_extra["token_ids"]
    return ids

  async def all_of():
    async with openai.AsyncOpenAI(base_url=f"http://{server.http_target}/v1", api_key=KEY,
                                  max_retries=0, timeout=120) as c:
      return await asyncio.gather(*(one(c, i) for i in range(len(texts))))

  assert asyncio.run(all_of()) == [ids for ids, _ in ref]
  assert no_leaks(server)


def test_prompt_forms_and_seeded_samples(client, reference, llm):
  texts, ref, _ = reference
  got = client.completions.create(model="tiny", prompt=texts[:2], extra_body=AS_IDS, **GREEDY)
  assert [c.index for c in got.choices] == [0, 1]
  assert [c.model_extra["token_ids"] for c in got.choices] == [ref[0][0], ref[1][0]]
  assert got.usage.prompt_tokens == len(texts[0]) + len(texts[1])
  assert got.usage.completion_tokens == 16
  ids = [llm.tokenizer.encode_prompt(t) for t in texts[:2]]
  one = client.completions.create(model="tiny", prompt=ids[0], extra_body=AS_IDS, **GREEDY)
  assert one.choices[0].model_extra["token_ids"] == ref[0][0]
  two = client.completions.create(model="tiny", prompt=ids, extra_body=AS_IDS, **GREEDY)
  assert [c.model_extra["token_ids"] for c in two.choices] == [ref[0][0], ref[1][0]]
  sampled = [client.completions.create(model="tiny", prompt=texts[2], n=3, seed=7, max_tokens=6,
                                       temperature=1.0, extra_body=AS_IDS) for _ in range(2)]
  runs = [[c.model_extra["token_ids"] for c in s.choices] for s in sampled]
  assert [c.index for c in sampled[0].choices] == [0, 1, 2]
  assert runs[0] == runs[1] and len({tuple(r) for r in runs[0]}) > 1
  assert sampled[0].usage.completion_tokens == 18


def test_stop_strings(client, reference):
  texts, _, _ = reference
  for text in texts:
    free = client.completions.create(model="tiny", prompt=text, temperature=0.0,
                                      max_tokens=16).choices[0].text
    at = next((i for i, ch in enumerate(free)
               if i and ch.isascii() and ch.isalnum() and ch not in free[:i]), None)
    if at is not None:
      break
  else:
    pytest.skip("no printable character in the tiny model's answers")
  stop = free[at]
  (c,) = client.completions.create(model="tiny", prompt=text, temperature=0.0, max_tokens=16,
                                   stop=[stop, "never seen"]).choices
  assert (c.text, c.finish_reason, c.model_extra["stop_reason"]) == (free[:at], "stop", stop)
  (c,) = client.completions.create(model="tiny", prompt=text, temperature=0.0, max_tokens=16,
                                   stop=stop, extra_body={"include_stop_str_in_output": True}
                                   ).choices
  assert c.text == free[:at + 1] and c.finish_reason == "stop"


def test_usage_in_the_last_streamed_chunk(client, reference):
  texts, _, _ = reference
  chunks = list(client.completions.create(model="tiny", prompt=texts[0], stream=True, n=2,
                                          stream_options={"include_usage": True}, **GREEDY))
  *body, last = chunks
  assert last.choices == [] and last.usage.completion_tokens == 16
  assert last.usage.prompt_tokens == len(texts[0]) and last.usage.total_tokens == 16 + len(texts[0])
  assert all(ch.usage is None for ch in body) and {ch.choices[0].index for ch in body} == {0, 1}
  chunks = list(client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "w1"}], stream=True,
      stream_options={"include_usage": True}, **GREEDY))
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
  assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0


# ---------------------------------------------------------------- the other routes
def test_models_health_metrics_version(server, client):
  (card,) = client.models.list().data
  assert card.id == "tiny" and card.owned_by == "flying-jax" and client.models.retrieve("tiny")
  assert refused(lambda: client.models.retrieve("gpt-4")).status_code == 404
  assert http(server, "/health", token=None)[0] == 200
  assert http(server, "/version", token=None) == (200, {"version": "test",
                                                        "versions": {"flying-jax": "test"}})
  status, text = http(server, "/metrics", token=None)
  assert status == 200 and 'flying_partition_info{model_name="tiny",partition="1x8"} 1.0' in text
  count = [l for l in text.splitlines() if l.startswith("flying_time_to_first_token_seconds_count")]
  assert float(count[0].split()[-1]) > 0
  status, body = http(server, "/v2/nothing")
  assert status == 404 and "no route" in body["error"]["message"]


def test_api_key(server):
  bad = openai.OpenAI(base_url=f"http://{server.http_target}/v1", api_key="wrong",
                      max_retries=0)
  err = refused(lambda: bad.completions.create(model="tiny", prompt="w1", max_tokens=2))
  assert err.status_code == 401 and "API key" in err.body["message"]
  status, body = http(server, "/v1/completions", {"model": "tiny", "prompt": "w1"}, token=None)
  assert status == 401 and body["error"]["code"] == "invalid_api_key"
  assert http(server, "/v1/models", token=None)[0] == 401
  assert http(server, "/health", token=None)[0] == 200       # not behind the key


def test_bad_requests_are_400_with_messages(server, client):
  base = dict(model="tiny", prompt="w1 w2", max_tokens=2)
  cases = [
      (dict(temperature=-1), "temperature must be finite and >= 0", "temperature"),
      (dict(prompt=""), "prompt is empty", "prompt"),
      (dict(prompt=[]), "prompt is empty", "prompt"),
      (dict(prompt="w1 " * 100), "at most 200", "prompt"),
      (dict(prompt=[1, 10**6]), "outside the vocabulary", "prompt"),
      (dict(top_p=0), "top_p", "top_p"),
      (dict(n=0), "n must be", "n"),
      (dict(logprobs=50), "logprobs", "logprobs"),
      (dict(max_tokens=10**6), "exceeds", None),
      (dict(echo=True), "echo is not supported", "echo"),
      (dict(stop=[""]), "stop", "stop"),
      (dict(extra_body={"max_token": 3}), "Unrecognized request argument supplied: max_token",
       "max_token"),
      (dict(extra_body={"response_format": {"type": "xml"}}), "'json_schema'",
       "response_format.type"),
      (dict(extra_body={"response_format": {"type": "json_schema"}}), "json_schema.schema",
       "response_format"),
      (dict(extra_body={"response_format": {"type": "json_schema", "json_schema": {
          "name": "x", "schema": {"type": "object"}, "bogus": 1}}}), "bogus", None),
      (dict(extra_body={"guided_json": "{not json"}), "not valid JSON", "guided_json"),
      (dict(extra_body={"guided_regex": "a+", "guided_choice": ["a"]}), "one output constraint",
       None),
      (dict(extra_body={"structured_outputs": {"choice": []}}), "choice", "structured_outputs"),
  ]
  for kw, message, param in cases:
    err = refused(lambda: client.completions.create(**{**base, **kw}))
    assert err.status_code == 400 and message in err.body["message"], (kw, err.body)
    assert err.body["type"] == "invalid_request_error"
    if param is not None:
      assert err.body["param"] == param, (kw, err.body)
  err = refused(lambda: client.completions.create(**{**base, "model": "gpt-4"}))
  assert err.status_code == 404 and err.body["code"] == "model_not_found"
  chat = dict(model="tiny", max_tokens=2)
  for kw, message in [(dict(messages=[{"role": "robot", "content": "x"}]), "chat role"),
                      (dict(messages=[]), "no messages"),
                      (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
                       "only text content parts"),
                      (dict(messages=[{"role": "user", "content": "x"}], top_logprobs=2),
                       "top_logprobs needs logprobs")]:
    err = refused(lambda: client.chat.completions.create(**chat, **kw))
    assert err.status_code == 400 and message in err.body["message"], (kw, err.body)
  status, body = http(server, "/v1/completions", raw=b'{"prompt": ')
  assert status == 400 and "not valid JSON" in body["error"]["message"]
  status, body = http(server, "/v1/completions", raw=b'[1, 2]')
  assert status == 400 and "must be a JSON object" in body["error"]["message"]
  status, body = http(server, "/v1/completions", raw=b'{"prompt": "w\\ud800"}')
  assert status == 400 and "not valid Unicode" in body["error"]["message"]
  assert no_leaks(server)


def test_a_full_queue_is_429(server, client):
  loop = server.server.loop
  loop.max_waiting = 1
  held = threading.Event()
  try:
    loop.call(lambda e: held.wait(30))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(client.completions.create, model="tiny", prompt="w1", max_tokens=2)
      time.sleep(0.3)
      second = pool.submit(refused, lambda: client.completions.create(
          model="tiny", prompt="w1", max_tokens=2))
      time.sleep(0.3)
      held.set()
      assert first.result().choices[0].finish_reason == "length"
      err = second.result()
    assert err.status_code == 429 and "queue is full" in err.body["message"]
  finally:
    held.set()
    loop.max_waiting = 256
  assert no_leaks(server)


def test_a_failed_step_is_a_500(server, client):
  def fail_once():
    del server.server.engine.step                 # the class's step again from the next one
    raise RuntimeError("injected failure")

  for stream in (False, True):
    server.server.loop.call(lambda e: setattr(e, "step", fail_once)).result()
    with pytest.raises(openai.APIError, match="injected failure") as err:
      list(client.completions.create(model="tiny", prompt="w1", max_tokens=2, stream=True)) \
          if stream else client.completions.create(model="tiny", prompt="w1", max_tokens=2)
    assert stream or err.value.status_code == 500
  assert no_leaks(server)


def test_a_client_that_goes_away_frees_its_pages(server, client):
  aborted = lambda: gauge(scrape(server), "flying_request_success_total", finished_reason="abort")
  before = aborted()
  long = dict(model="tiny", prompt="w1 w2 w3", max_tokens=500, temperature=0.0,
              extra_body={"ignore_eos": True})
  stream = client.completions.create(stream=True, **long)
  it = iter(stream)
  assert [next(it), next(it)]
  stream.close()
  assert no_leaks(server) and aborted() == before + 1
  impatient = client.with_options(timeout=1.0)
  with pytest.raises(openai.APITimeoutError):
    impatient.completions.create(**long)
  assert no_leaks(server) and aborted() == before + 2


# ---------------------------------------------------------------- admin, bench
def test_admin_over_http(server, client):
  assert http(server, "/admin/stats", token=None)[0] == 401
  assert http(server, "/admin/stats", token="wrong")[0] == 403
  status, stats = http(server, "/admin/stats", token=TOKEN)
  assert status == 200 and stats["partition"] == "1x8" and not stats["draining"]
  status, info = http(server, "/admin/info", token=TOKEN)
  assert info["model"] == "tiny" and info["vocab_size"] == 512
  status, body = http(server, "/admin/pin", {"partition": "2"}, token=TOKEN)
  assert status == 400 and "not compiled" in body["error"]["message"]
  status, body = http(server, "/admin/pin", {"partition": "8", "strategy": "recompute"},
                      token=TOKEN)
  assert status == 200 and body["stats"]["partition"] == "8" and body["stats"]["policy"] == "static"
  assert client.completions.create(model="tiny", prompt="w4", max_tokens=3).choices[0] \
      .finish_reason == "length"
  status, body = http(server, "/admin/release", {}, token=TOKEN)
  assert status == 200 and body["stats"]["policy"] == "none"
  assert http(server, "/admin/policy", {"policy": "fastest"}, token=TOKEN)[0] == 400
  http(server, "/admin/pin", {"partition": 1, "strategy": "recompute"}, token=TOKEN)
  assert http(server, "/admin/release", {}, token=TOKEN)[0] == 200
  config = server.server.config
  server.server.config = dataclasses.replace(config, admin_token=None)
  try:
    status, body = http(server, "/admin/stats", token=TOKEN)
    assert status == 403 and "--admin-token" in body["error"]["message"]
  finally:
    server.server.config = config


def test_bench_over_the_openai_api(server, tmp_path, capsys):
  from flying_jax import cli

  prompt_tokens = lambda: gauge(scrape(server), "flying_prompt_tokens_total")
  before = prompt_tokens()
  out = tmp_path / "bench.json"
  assert cli.main(["bench", "--api", "openai", "--target", server.http_target, "--api-key", KEY,
                   "--admin-token", TOKEN, "--requests", "4", "--rate", "50", "--input-len",
                   "fixed:8", "--output-len", "fixed:4", "--shared-prefix-tokens", "16",
                   "--warmup", "1", "--json", str(out)]) == 0
  (run,) = json.loads(out.read_text())["runs"].values()
  s = run["summary"]
  assert (s["completed"], s["failed"], s["output_tokens"]) == (4, 0, 16), s
  assert all(r["input_tokens"] == 24 for r in run["requests"])
  assert prompt_tokens() - before == 5 * 24           # the warm-up too: the prefix reached it
  assert s["ttft_ms"]["median"] > 0 and "Successful requests:" in capsys.readouterr().out
  assert cli.main(["bench", "compare", "--api", "openai", "--target", server.http_target,
                   "--api-key", KEY, "--admin-token", TOKEN, "--requests", "2", "--input-len",
                   "fixed:4", "--output-len", "fixed:2", "--warmup", "0", "--json", str(out)]) == 0
  runs = json.loads(out.read_text())["runs"]            # the policy set over /admin/policy
  assert {n: r["summary"]["completed"] for n, r in runs.items()} == \
      {"static DP": 2, "static TP8": 2, "auto": 2}
  assert http(server, "/admin/policy", {"policy": None}, token=TOKEN)[0] == 200
  assert no_leaks(server)


# ---------------------------------------------------------------- last: draining
def test_drain_makes_new_requests_503(server, client):
  status, body = http(server, "/admin/drain", {}, token=TOKEN)
  assert status == 200 and body["stats"]["draining"]
  assert http(server, "/health", token=None)[0] == 503
  err = refused(lambda: client.completions.create(model="tiny", prompt="w1", max_tokens=2))
  assert err.status_code == 503 and "draining" in err.body["message"]

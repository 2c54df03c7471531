"""The gRPC contracts: stubs up to date with serve/proto, JetStream's wire names and numbers."""

from pathlib import Path

from flying_jax.serving import protos
from flying_jax.serving.proto import flying_jax_pb2, jetstream_pb2


def test_regenerating_the_stubs_changes_nothing(tmp_path):
  fresh = protos.generate(tmp_path)
  assert {p.name for p in fresh} == {f"{n}{s}" for n in ("flying_jax", "jetstream")
                                     for s in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")}
  committed = protos.ROOT / protos.PACKAGE_PATH
  for path in fresh:
    assert (committed / path.name).read_bytes() == path.read_bytes(), \
        f"{path.name} is stale: run `make protos`"


def _fields(message) -> dict:
  return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_jetstream_contract_matches_jetstream():
  fd = jetstream_pb2.DESCRIPTOR
  assert fd.package == "jetstream_proto"
  svc = fd.services_by_name["Orchestrator"]
  decode, health = svc.methods_by_name["Decode"], svc.methods_by_name["HealthCheck"]
  assert decode.server_streaming and not decode.client_streaming and not health.server_streaming
  assert decode.input_type.full_name == "jetstream_proto.DecodeRequest"
  assert _fields(jetstream_pb2.DecodeRequest) == {
      "max_tokens": 4, "text_content": 5, "token_content": 6, "metadata": 7, "num_samples": 8,
      "lora_adapter_id": 9, "has_bos": 10}
  req = jetstream_pb2.DecodeRequest
  assert _fields(req.TextContent) == {"text": 1} and _fields(req.TokenContent) == {"token_ids": 1}
  assert _fields(req.Metadata) == {"start_time": 1}
  assert _fields(jetstream_pb2.DecodeResponse) == {"initial_content": 2, "stream_content": 3}
  sample = jetstream_pb2.DecodeResponse.StreamContent.Sample
  assert _fields(sample) == {"text": 1, "token_ids": 2}
  assert _fields(jetstream_pb2.HealthCheckResponse) == {"is_live": 1}
  # the oneofs JetStream clients set
  assert set(req.DESCRIPTOR.oneofs_by_name) == {"content", "metadata_optional"}
  assert set(jetstream_pb2.DecodeResponse.DESCRIPTOR.oneofs_by_name) == {"content"}


def test_our_contract_names_its_services():
  fd = flying_jax_pb2.DESCRIPTOR
  assert fd.package == "flying_jax.v1"
  assert set(fd.services_by_name) == {"Generation", "Admin"}
  gen = fd.services_by_name["Generation"]
  assert set(gen.methods_by_name) == {"Generate", "Tokenize", "Detokenize", "GetServerInfo",
                                      "GetStats"}
  assert gen.methods_by_name["Generate"].server_streaming
  assert set(fd.services_by_name["Admin"].methods_by_name) == {
      "SetPolicy", "PinPartition", "ReleasePartition", "Drain"}
  assert {"text", "chat", "token_ids"} <= set(_fields(flying_jax_pb2.GenerateRequest))
  assert Path(protos.SOURCES / "jetstream.proto").exists()

"""`flying-jax serve` in its own process: the CLI client, then SIGTERM drains and exits 0."""

import os
import re
import signal
import subprocess
import sys

import grpc

from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc


def start(tmp_path, *flags):
  """`flying-jax serve` on the tiny model; returns (process, HOST:PORT) once it says ready."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "flying_jax.cli", "serve", "--model", "tiny", "--mesh", "cpu-8",
       "--width", "1", "--port", "0", *flags],
      cwd=tmp_path, env=dict(os.environ), stdout=subprocess.PIPE,
      stderr=open(tmp_path / "serve.err", "w"), text=True)
  port = None
  for line in proc.stdout:
    m = re.search(r"serving tiny on 127\.0\.0\.1:(\d+)", line)
    port = int(m.group(1)) if m else port
    if line.strip() == "flying-jax: ready":
      break
  if not port:
    proc.kill()
    raise AssertionError((tmp_path / "serve.err").read_text())
  return proc, f"127.0.0.1:{port}"


def test_request_cli_then_sigterm_drains_and_exits_0(tmp_path):
  proc, target = start(tmp_path, "--drain-grace", "60")
  try:
    cli = subprocess.run([sys.executable, "-m", "flying_jax.cli", "request", "--target", target,
                          "--max-tokens", "5", "--usage", "w1 w2 w3"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "finish length" in cli.stderr and "completion 5" in cli.stderr
    with grpc.insecure_channel(target) as ch:
      stub = pb_grpc.GenerationStub(ch)
      req = pb.GenerateRequest(text="w1 w2", sampling=pb.Sampling(temperature=0.0, max_tokens=400,
                                                                  ignore_eos=True))
      call = stub.Generate(req, timeout=300)
      first = next(call)
      proc.send_signal(signal.SIGTERM)               # mid-stream
      rest = list(call)
      assert rest[-1].finish_reason == "length"      # the running request finished in full
      assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 400
      try:
        list(stub.Generate(req, timeout=30))
        refused = None
      except grpc.RpcError as e:
        refused = e.code()
      # refused while draining, or by the gRPC server already stopping (its grace period cancels
      # a call that arrives as it stops): never served
      assert refused in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE,
                         grpc.StatusCode.CANCELLED)
    assert proc.wait(timeout=120) == 0
  finally:
    if proc.poll() is None:
      proc.kill()


def test_tls(tmp_path):
  key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                  "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                  "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
  proc, target = start(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
  try:
    cli = subprocess.run([sys.executable, "-m", "flying_jax.cli", "request", "--target", target,
                          "--tls-ca", str(cert), "--max-tokens", "3", "--usage", "w1"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "completion 3" in cli.stderr, cli.stderr
    plain = subprocess.run([sys.executable, "-m", "flying_jax.cli", "request", "--target", target,
                            "--max-tokens", "3", "--timeout", "10", "w1"],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "error: UNAVAILABLE" in plain.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()

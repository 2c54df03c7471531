"""The deployment files: manifests parse, probes and scrape annotations point at the served ports,
and the container's command line is one `flying-jax serve` accepts."""

import json
import pathlib
import re

import pytest
import yaml

from flying_jax import cli
from flying_jax.config import load_mesh_preset

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "serve" / "deploy"
RESOURCE = {"tpu-v5e-8.yaml": ("google.com/tpu", "tpu"), "gpu-8.yaml": ("nvidia.com/gpu", "gpu")}


def dockerfile(kind: str) -> dict:
  text = (DEPLOY / f"Dockerfile.{kind}").read_text()
  entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
  cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
  expose = {int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()}
  return {"entrypoint": entry, "cmd": cmd, "expose": expose, "text": text}


def flag(args: list[str], name: str) -> str:
  return args[args.index(name) + 1]


@pytest.mark.parametrize("manifest", sorted(RESOURCE))
def test_manifest_probes_ports_and_command(manifest):
  docs = list(yaml.safe_load_all((DEPLOY / "k8s" / manifest).read_text()))
  by_kind = {d["kind"]: d for d in docs}
  assert set(by_kind) == {"Deployment", "Service"}
  dep, svc = by_kind["Deployment"], by_kind["Service"]
  pod = dep["spec"]["template"]
  assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
  assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
  (c,) = pod["spec"]["containers"]
  resource, kind = RESOURCE[manifest]
  image = dockerfile(kind)
  assert c["image"] == f"flying-jax:{kind}" and f"Dockerfile.{kind}" in (DEPLOY / "k8s" /
                                                                        manifest).read_text()

  # the command the container runs parses as `flying-jax serve`, and names the ports served
  argv = image["entrypoint"][1:] + c["args"]
  args = cli.build_parser().parse_args(argv)
  assert args.command == "serve" and args.host == "0.0.0.0"
  ports = {p["name"]: p["containerPort"] for p in c["ports"]}
  assert ports == {"grpc": args.port, "metrics": args.metrics_port}
  assert set(ports.values()) <= image["expose"]

  # gRPC probes on the health service of the served port; readiness, liveness and start-up
  for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    assert c[probe]["grpc"]["port"] == args.port, probe
  assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600

  # Prometheus scrapes the metrics port; the Service routes both ports
  ann = pod["metadata"]["annotations"]
  assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
  assert int(ann["prometheus.io/port"]) == args.metrics_port
  svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
  assert svc_ports["grpc"]["targetPort"] == "grpc" and svc_ports["grpc"]["port"] == args.port
  assert svc_ports["grpc"]["appProtocol"] == "grpc"
  assert svc_ports["metrics"]["targetPort"] == "metrics"

  # the accelerators asked for are the mesh preset's devices; draining fits the grace period
  assert c["resources"]["limits"][resource] == load_mesh_preset(args.mesh).devices
  assert pod["spec"]["terminationGracePeriodSeconds"] > args.drain_grace
  assert any(m["mountPath"] == "/cache" for m in c["volumeMounts"])
  assert "XDG_CACHE_HOME=/cache" in image["text"]


@pytest.mark.parametrize("kind", ["gpu", "tpu"])
def test_dockerfile_default_command_parses(kind):
  image = dockerfile(kind)
  args = cli.build_parser().parse_args(image["entrypoint"][1:] + image["cmd"])
  assert args.command == "serve" and load_mesh_preset(args.mesh).platform == kind
  assert {args.port, args.metrics_port} <= image["expose"]
  pinned = re.search(r'"jax==([\d.]+)"', (DEPLOY.parent.parent / "pyproject.toml").read_text())
  assert f"jax[{'cuda12' if kind == 'gpu' else 'tpu'}]=={pinned.group(1)}" in image["text"]


@pytest.mark.parametrize("kind", ["gpu", "tpu"])
def test_dockerfile_installs_the_wheel_not_the_checkout(kind):
  """The image runs the installed wheel: its cards and presets come from the package, so the
  final stage copies no models/ or meshes/ and runs from a folder that holds none."""
  text = dockerfile(kind)["text"]
  final = text[text.rindex("\nFROM "):]
  assert "pip wheel" in text[:text.rindex("\nFROM ")]
  assert "/wheels/flying_jax-*.whl" in final
  assert not re.search(r"^COPY (?!--from=wheel)", final, re.M), "the image copies the checkout"
  assert re.search(r"^WORKDIR /srv$", final, re.M)
  ignored = (DEPLOY.parent.parent / ".dockerignore").read_text().split()
  assert ".venv/" in ignored and ".git/" in ignored


MULTI_HOST = {"tpu-v5e-16.yaml": ("google.com/tpu", "tpu"), "gpu-2x8.yaml": ("nvidia.com/gpu", "gpu")}


@pytest.mark.parametrize("manifest", sorted(MULTI_HOST))
def test_multi_host_manifest_runs_one_engine_over_the_preset_hosts(manifest):
  """A LeaderWorkerSet of the mesh preset's hosts: every pod's command parses as `flying-jax
  serve` joining the cluster (with the variables the LeaderWorkerSet sets), each pod asks for one
  host's devices, the Service and the probes reach the leader only."""
  docs = list(yaml.safe_load_all((DEPLOY / "k8s" / manifest).read_text()))
  by_kind = {d["kind"]: d for d in docs}
  assert set(by_kind) == {"LeaderWorkerSet", "Service"}
  lws, svc = by_kind["LeaderWorkerSet"], by_kind["Service"]
  assert lws["apiVersion"].startswith("leaderworkerset.x-k8s.io/")
  tmpl = lws["spec"]["leaderWorkerTemplate"]
  leader, worker = tmpl["leaderTemplate"], tmpl["workerTemplate"]
  (lc,), (wc,) = leader["spec"]["containers"], worker["spec"]["containers"]
  resource, kind = MULTI_HOST[manifest]
  image = dockerfile(kind)
  assert lc["image"] == wc["image"] == f"flying-jax:{kind}"
  assert lc["args"] == wc["args"]                          # one command, every process
  size = tmpl["size"]
  for index in range(size):                                # as Kubernetes expands $(VAR)
    env = {"LWS_LEADER_ADDRESS": "leader.example", "LWS_GROUP_SIZE": str(size),
           "LWS_WORKER_INDEX": str(index)}
    argv = image["entrypoint"][1:] + [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a)
                                      for a in lc["args"]]
    args = cli.build_parser().parse_args(argv)
    assert args.command == "serve" and args.process_id == index
    assert args.num_processes == size and args.coordinator.startswith("leader.example:")
  preset = load_mesh_preset(args.mesh)
  assert size == preset.hosts > 1
  for c in (lc, wc):
    assert c["resources"]["limits"][resource] == preset.host_devices
  ports = {p["name"]: p["containerPort"] for p in lc["ports"]}
  assert ports["coordinator"] == int(args.coordinator.rsplit(":", 1)[1])
  assert ports["grpc"] == args.port and ports["metrics"] == args.metrics_port
  for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    assert lc[probe]["grpc"]["port"] == args.port and probe not in wc
  assert svc["spec"]["selector"].items() <= leader["metadata"]["labels"].items()
  assert not svc["spec"]["selector"].items() <= worker["metadata"]["labels"].items()
  assert leader["spec"]["terminationGracePeriodSeconds"] > args.drain_grace

"""Joining the processes of one engine: `jax.distributed.initialize`, and what it needs on CPUs.

On TPU slices and common cluster schedulers (SLURM, Open MPI, Kubernetes with the TPU or GKE
environment) JAX finds the coordinator, the process count and this process's id itself; elsewhere
they are given (`--coordinator HOST:PORT --num-processes N --process-id I`). CPU devices of
different processes talk through gloo collectives.
"""

from __future__ import annotations

import dataclasses


class ClusterError(ValueError):
  """The cluster flags are inconsistent."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  coordinator: str | None = None     # HOST:PORT of process 0 (None: detected by JAX)
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 300               # how long to wait for every process to join
  heartbeat_s: int = 30              # a process silent this long fails the cluster

  def __post_init__(self):
    given = [x is not None for x in (self.coordinator, self.num_processes, self.process_id)]
    if any(given) and not all(given):
      raise ClusterError("--coordinator, --num-processes and --process-id go together (or none "
                         "of them, where JAX detects the cluster)")
    if self.num_processes is not None:
      if self.num_processes < 1:
        raise ClusterError(f"--num-processes must be >= 1, not {self.num_processes}")
      if not 0 <= self.process_id < self.num_processes:
        raise ClusterError(f"--process-id must be in 0..{self.num_processes - 1}, not "
                           f"{self.process_id}")
    if self.coordinator is not None and ":" not in self.coordinator:
      raise ClusterError(f"--coordinator is HOST:PORT, not {self.coordinator!r}")

  @classmethod
  def from_args(cls, args) -> "ClusterSpec | None":
    """The spec the `serve` flags give, or None when the process serves alone."""
    if not (args.coordinator or args.num_processes or args.process_id is not None or
            args.cluster_auto):
      return None
    return cls(args.coordinator, args.num_processes, args.process_id,
               heartbeat_s=args.heartbeat_timeout)


@dataclasses.dataclass(frozen=True)
class Cluster:
  process_id: int
  processes: int

  @property
  def leader(self) -> bool:
    return self.process_id == 0


def join(spec: ClusterSpec) -> Cluster:
  """Connect to the other processes (before anything else uses JAX); returns who we are."""
  import jax

  # CPU devices of different processes need a collectives backend (harmless elsewhere)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if spec.coordinator is not None:
    kwargs = dict(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                  process_id=spec.process_id)
  jax.distributed.initialize(initialization_timeout=spec.timeout_s,
                             heartbeat_timeout_seconds=spec.heartbeat_s, **kwargs)
  return Cluster(jax.process_index(), jax.process_count())


def add_flags(p):
  """The `serve` flags that join a cluster."""
  g = p.add_argument_group("across hosts (jax.distributed)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="process 0's address and a free port for JAX's coordinator; with "
                      "--num-processes and --process-id, join that many processes as one engine")
  g.add_argument("--num-processes", type=int, default=None, help="processes in the cluster")
  g.add_argument("--process-id", type=int, default=None,
                 help="this process's id (0: the leader, which serves; others follow it)")
  g.add_argument("--heartbeat-timeout", type=int, default=30, metavar="S",
                 help="a process that has not answered for S seconds fails the cluster: the "
                      "others stop with an error instead of waiting for it")
  g.add_argument("--cluster-auto", action="store_true",
                 help="join the cluster JAX detects (TPU slices, SLURM, Open MPI, GKE)")

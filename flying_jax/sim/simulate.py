"""Build a simulated engine for a model on a hardware preset, and run a workload through it."""

from __future__ import annotations

import contextlib
import dataclasses
import gc

from flying_jax.config import MeshPreset, ModelCard, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.sim import hardware as H
from flying_jax.sim.cost import ModelCosts, make_model
from flying_jax.sim.driver import Outcome, drive
from flying_jax.sim.runtime import SimClock, SimRuntime


def model_card(name: str, max_context: int | None = None) -> ModelCard:
  card = load_model_card(name)
  if max_context:
    card = dataclasses.replace(card, arch=dataclasses.replace(card.arch, max_context=max_context))
  return card


def simulated_engine(card: ModelCard, hw: H.Hardware, policy=None,
                     mesh: str | MeshPreset | None = None, config: EngineConfig | None = None,
                     record=None) -> tuple[Engine, SimClock, H.Plan]:
  """An engine of `card` on `hw` whose steps take simulated time. Default `config`: every width
  and mixed partition the plan allows, the data-parallel width served first."""
  plan = H.plan(card, hw, mesh)
  clock = SimClock()
  costs = ModelCosts.of(card.arch, H.dtype_bytes(plan.preset))
  runtime = SimRuntime(hw, make_model(hw, card.arch.n_layers), costs, clock, record)
  config = dataclasses.replace(config or EngineConfig(widths=plan.widths), cache_dir=None,
                               prefix_cache=False)     # its prompts are token 0 repeated
  engine = Engine(card, plan.preset, config, devices=list(range(plan.preset.devices)),
                  policy=policy, clock=clock, runtime=runtime.build)
  return engine, clock, plan


def simulate(card: ModelCard, hw: H.Hardware, arrivals, policy, mesh: str | None = None,
             progress=None) -> Outcome:
  engine, clock, _ = simulated_engine(card, hw, policy, mesh)
  with without_gc():
    return drive(engine, arrivals, clock.wait_until, progress=progress)


@contextlib.contextmanager
def without_gc():
  """The cycle collector off for a run: it would walk every live request each few thousand
  allocations (a third of the simulator's time), and a run makes no cycles worth collecting."""
  gc.collect()
  gc.freeze()
  gc.disable()
  try:
    yield
  finally:
    gc.enable()
    gc.unfreeze()

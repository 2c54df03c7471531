"""Workloads for the serving benchmark: when requests arrive, how long they are, how urgent.

Arrival processes (all seeded, times in seconds from the start):
  poisson(rate)          exponential gaps;
  gamma(rate, burstiness)  gamma gaps of mean 1/rate and shape `burstiness` (1 = Poisson, < 1 =
                         burstier), as vLLM's benchmark does;
  phased([(seconds, rate), ...])   piecewise-constant Poisson rate (e.g. low -> burst -> low);
  diurnal(low, high, period)       a rate ramping low -> high -> low over each period;
  replay(file)           timestamps (and lengths, priorities) from a trace file.
Lengths: synthetic from a distribution (`fixed:N`, `uniform:A:B`, `lognormal:MEAN:SIGMA`), or the
prompts of a ShareGPT-format JSON file with their reference answers' lengths as output lengths.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Arrival:
  at: float                         # seconds from the start
  input_tokens: int
  output_tokens: int
  priority: int = 0
  prompt: str | None = None         # text (ShareGPT) or None: random token ids


# arrival times -----------------------------------------------------------------------------------
def poisson(rate: float, n: int, seed: int = 0) -> np.ndarray:
  return gamma(rate, 1.0, n, seed)


def gamma(rate: float, burstiness: float, n: int, seed: int = 0) -> np.ndarray:
  if rate <= 0 or burstiness <= 0:
    raise ValueError("rate and burstiness must be > 0")
  gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n)
  return np.cumsum(gaps) - gaps[0]


def phased(phases: list[tuple[float, float]], seed: int = 0) -> np.ndarray:
  """Poisson arrivals whose rate is constant within each (seconds, rate) phase."""
  rng = np.random.default_rng(seed)
  out, start = [], 0.0
  for seconds, rate in phases:
    if rate > 0:
      k = rng.poisson(rate * seconds)
      out.append(np.sort(start + rng.uniform(0.0, seconds, size=k)))
    start += seconds
  return np.concatenate(out) if out else np.zeros(0)


def diurnal(low: float, high: float, period: float, duration: float, seed: int = 0) -> np.ndarray:
  """A rate low + (high - low) * (1 - cos(2 pi t / period)) / 2, by thinning a Poisson process."""
  rng = np.random.default_rng(seed)
  cand = np.sort(rng.uniform(0.0, duration, size=rng.poisson(high * duration)))
  rate = low + (high - low) * (1 - np.cos(2 * math.pi * cand / period)) / 2
  return cand[rng.uniform(size=cand.size) < rate / high]


def parse_phases(spec: str) -> list[tuple[float, float]]:
  """`"20:0.5,10:8,20:0.5"`: seconds:rate pairs."""
  try:
    phases = [(float(a), float(b)) for a, b in (p.split(":") for p in spec.split(","))]
  except ValueError:
    raise ValueError(f"phases are SECONDS:RATE pairs joined by commas, got {spec!r}") from None
  if any(s <= 0 or r < 0 for s, r in phases):
    raise ValueError("phase lengths must be > 0 and rates >= 0")
  return phases


# lengths -----------------------------------------------------------------------------------------
def lengths(spec: str, n: int, rng: np.random.Generator) -> np.ndarray:
  """`fixed:N`, `uniform:A:B` (inclusive) or `lognormal:MEAN:SIGMA` (rounded, at least 1)."""
  kind, *args = spec.split(":")
  try:
    if kind == "fixed" and len(args) == 1:
      return np.full(n, int(args[0]))
    if kind == "uniform" and len(args) == 2:
      return rng.integers(int(args[0]), int(args[1]) + 1, size=n)
    if kind == "lognormal" and len(args) == 2:
      mean, sigma = float(args[0]), float(args[1])
      mu = math.log(mean) - sigma ** 2 / 2
      return np.maximum(1, np.round(rng.lognormal(mu, sigma, size=n))).astype(int)
  except ValueError:
    pass
  raise ValueError(f"a length is fixed:N, uniform:A:B or lognormal:MEAN:SIGMA, got {spec!r}")


def synthetic(times: np.ndarray, input_len: str, output_len: str, priority_share: float = 0.0,
              seed: int = 0) -> list[Arrival]:
  rng = np.random.default_rng(seed + 1)
  n = len(times)
  ins, outs = lengths(input_len, n, rng), lengths(output_len, n, rng)
  urgent = rng.uniform(size=n) < priority_share
  return [Arrival(float(t), int(i), int(o), int(u)) for t, i, o, u in zip(times, ins, outs, urgent)]


def sharegpt(path: str | Path, times: np.ndarray, tokenizer, max_output: int = 1024,
             priority_share: float = 0.0, seed: int = 0) -> list[Arrival]:
  """The first human turn of each conversation as the prompt, the reply's length as output."""
  data = json.loads(Path(path).read_text())
  pairs = []
  for conv in data:
    turns = conv.get("conversations") or conv.get("conversation") or []
    if len(turns) >= 2 and turns[0].get("value") and turns[1].get("value"):
      pairs.append((turns[0]["value"], turns[1]["value"]))
  if not pairs:
    raise ValueError(f"{path}: no conversation with a prompt and a reply")
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(pairs))
  urgent = rng.uniform(size=len(times)) < priority_share
  out = []
  for k, t in enumerate(times):
    prompt, reply = pairs[order[k % len(pairs)]]
    n_out = max(1, min(max_output, len(tokenizer.encode(reply))))
    out.append(Arrival(float(t), len(tokenizer.encode(prompt)), n_out, int(urgent[k]), prompt))
  return out


def replay(path: str | Path) -> list[Arrival]:
  """A trace file: JSON lines (or a JSON list) of {"at", "input_tokens", "output_tokens",
  optional "priority", optional "prompt"}."""
  text = Path(path).read_text().strip()
  rows = json.loads(text) if text.startswith("[") else [json.loads(l) for l in text.splitlines()
                                                         if l.strip()]
  try:
    out = [Arrival(float(r["at"]), int(r["input_tokens"]), int(r["output_tokens"]),
                   int(r.get("priority", 0)), r.get("prompt")) for r in rows]
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: each row needs at, input_tokens, output_tokens ({e})") from None
  t0 = min((a.at for a in out), default=0.0)
  return sorted((dataclasses.replace(a, at=a.at - t0) for a in out), key=lambda a: a.at)


def save(arrivals: list[Arrival], path: str | Path):
  Path(path).write_text("".join(json.dumps(dataclasses.asdict(a)) + "\n" for a in arrivals))


# from the command line ----------------------------------------------------------------------------
def add_arguments(p, requests: int = 100, rate: float = 2.0, phases: str = "20:0.5,10:6,20:0.5",
                  input_len: str = "uniform:16:128", output_len: str = "uniform:16:64"):
  """The workload flags `flying-jax bench` and `flying-jax sim` share."""
  p.add_argument("--requests", type=int, default=requests, help="requests (poisson, gamma)")
  p.add_argument("--arrival", default="poisson",
                 choices=["poisson", "gamma", "phased", "diurnal"])
  p.add_argument("--rate", type=float, default=rate, help="mean requests per second")
  p.add_argument("--burstiness", type=float, default=1.0,
                 help="gamma shape: 1 = Poisson, below 1 = burstier")
  p.add_argument("--phases", default=phases,
                 help="phased arrivals: SECONDS:RATE pairs, e.g. low -> burst -> low")
  p.add_argument("--period", type=float, default=60.0, help="diurnal period (s)")
  p.add_argument("--duration", type=float, default=60.0, help="diurnal run length (s)")
  p.add_argument("--trace", default=None,
                 help="replay a trace file (JSON lines of at, input_tokens, output_tokens, "
                      "priority)")
  p.add_argument("--sharegpt", default=None, help="prompts from a ShareGPT-format JSON file")
  p.add_argument("--max-output", type=int, default=256, help="cap on ShareGPT output lengths")
  p.add_argument("--input-len", default=input_len,
                 help="synthetic prompt lengths: fixed:N, uniform:A:B or lognormal:MEAN:SIGMA")
  p.add_argument("--output-len", default=output_len, help="synthetic output lengths")
  p.add_argument("--priority-share", type=float, default=0.0,
                 help="share of latency-critical requests (priority 1)")
  p.add_argument("--seed", type=int, default=0)


def from_args(args, tokenizer=None) -> list[Arrival]:
  """The workload the flags of `add_arguments` describe."""
  if args.trace:
    return replay(args.trace)
  if args.arrival == "poisson":
    times = poisson(args.rate, args.requests, args.seed)
  elif args.arrival == "gamma":
    times = gamma(args.rate, args.burstiness, args.requests, args.seed)
  elif args.arrival == "phased":
    times = phased(parse_phases(args.phases), args.seed)
  elif args.arrival == "diurnal":
    times = diurnal(args.rate / 4, args.rate, args.period, args.duration, args.seed)
  else:
    raise ValueError(f"unknown arrival process {args.arrival!r}")
  if args.sharegpt:
    if tokenizer is None:
      raise ValueError("a ShareGPT file needs the model's tokenizer (--model)")
    return sharegpt(args.sharegpt, times, tokenizer, args.max_output, args.priority_share,
                    args.seed)
  return synthetic(times, args.input_len, args.output_len, args.priority_share, args.seed)

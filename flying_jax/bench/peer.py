"""`flying-jax bench peer`: the same offline generation through Hugging Face transformers and
through flying-jax, on this machine.

Both load the same GGUF file (transformers with its GGUF loader, dequantized to float32 on the
PyTorch CPU build), get the same prompts as token ids, and decode greedily the same number of
tokens (EOS ignored). For each batch size: output tokens per second of each, their ratio, and how
many of the generated tokens agree. Each side runs its batch once untimed first (allocation,
compilation), then timed. Needs the `peer` extra: `pip install -e ".[peer]"`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import numpy as np


@dataclasses.dataclass
class PeerRow:
  batch: int
  peer_tok_s: float
  ours_tok_s: float
  agreement: float            # share of generated tokens equal in both

  @property
  def ratio(self) -> float:
    return self.ours_tok_s / self.peer_tok_s


def load_peer(card):
  """The Hugging Face model and its name, from the model card's GGUF file."""
  try:
    import torch
    from transformers import AutoModelForCausalLM
  except ImportError as e:
    raise RuntimeError("bench peer needs PyTorch and transformers: pip install -e '.[peer]'") \
        from e
  from flying_jax.checkpoints.gguf_reader import resolve_gguf_path

  if card.weights.format != "gguf":
    raise ValueError(f"bench peer loads GGUF files; {card.name} is {card.weights.format}")
  path = str(resolve_gguf_path(card.weights))
  model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                               gguf_file=os.path.basename(path),
                                               dtype=torch.float32)
  model.eval()
  return model, f"transformers {_version('transformers')} (PyTorch {torch.__version__} CPU)"


def _version(pkg: str) -> str:
  from importlib.metadata import version
  return version(pkg)


def peer_generate(model, prompts: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float]:
  import torch

  ids = torch.as_tensor(prompts, dtype=torch.long)
  with torch.inference_mode():
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t0
  return out[:, prompts.shape[1]:].numpy(), dt


def ours_generate(llm, prompts: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float]:
  from flying_jax.sampling import SamplingParams

  params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
  t0 = time.perf_counter()
  outs = llm.generate([{"prompt_token_ids": p} for p in prompts.tolist()], params,
                      use_tqdm=False)
  dt = time.perf_counter() - t0
  return np.asarray([o.outputs[0].token_ids for o in outs]), dt


def run_peer(args) -> int:
  from flying_jax.offline import LLM

  batches = [int(b) for b in args.batch_sizes.split(",")]
  llm = LLM(model=args.model, mesh=args.mesh, widths="all", policy=args.policy, progress=False)
  try:
    model, peer_name = load_peer(llm.card)
  except (RuntimeError, ValueError) as e:
    print(f"error: {e}")
    return 2
  import torch

  rng = np.random.default_rng(args.seed)
  vocab = llm.card.arch.vocab_size
  print(f"bench peer: {llm.card.name}, {args.input_tokens} prompt tokens, {args.output_tokens} "
        f"greedy output tokens per request; {peer_name}, {torch.get_num_threads()} threads; "
        f"flying-jax on {llm.preset.name}, policy {args.policy}; machine {platform.machine()}, "
        f"{os.cpu_count()} cores", flush=True)
  rows = []
  for b in batches:
    prompts = rng.integers(3, vocab, size=(b, args.input_tokens))
    peer_generate(model, prompts, 2)                 # warm-up, untimed
    ours_generate(llm, prompts, 2)
    theirs, t_peer = peer_generate(model, prompts, args.output_tokens)
    ours, t_ours = ours_generate(llm, prompts, args.output_tokens)
    n = b * args.output_tokens
    row = PeerRow(b, n / t_peer, n / t_ours, float((theirs == ours).mean()))
    rows.append(row)
    print(f"batch {b}: peer {row.peer_tok_s:.1f} tok/s, flying-jax {row.ours_tok_s:.1f} tok/s",
          flush=True)
  print(table(rows, peer_name))
  return 0


def table(rows: list[PeerRow], peer_name: str) -> str:
  lines = ["| batch | transformers (tok/s) | flying-jax (tok/s) | flying-jax / transformers | "
           "same tokens |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r.batch} | {r.peer_tok_s:.1f} | {r.ours_tok_s:.1f} | {r.ratio:.2f}x | "
                 f"{100 * r.agreement:.0f}% |")
  lines.append(f"(peer: {peer_name})")
  return "\n".join(lines)

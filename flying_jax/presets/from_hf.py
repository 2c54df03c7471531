"""A model card made from a Hugging Face checkpoint directory (`flying-jax card --from-hf DIR`).

Reads `config.json` (the architecture), finds the tokenizer (`tokenizer.json`, else a
SentencePiece `tokenizer.model`, else raw bytes), the stop ids (`eos_token_id` of
`generation_config.json` or `config.json`) and a ChatML chat template in `tokenizer_config.json`,
and writes a card whose weights are the directory's safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path


def _read(path: Path) -> dict:
  return json.loads(path.read_text()) if path.is_file() else {}


def _stop_ids(*configs: dict) -> list[int]:
  for config in configs:
    eos = config.get("eos_token_id")
    if eos is not None:
      return sorted({int(e) for e in (eos if isinstance(eos, list) else [eos])})
  return []


def toml_value(v) -> str:
  """A Python value as a TOML literal (enough for model cards and mesh presets)."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, str):
    return json.dumps(v)
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(toml_value(x) for x in v) + "]"
  return repr(v)


def card_from_hf(directory: str | Path, name: str | None = None) -> str:
  """The TOML text of a model card for the Hugging Face checkpoint in `directory`."""
  import dataclasses

  from flying_jax.checkpoints.safetensors_reader import architecture_from_hf_config
  from flying_jax.config import ConfigError

  d = Path(directory).expanduser().resolve()
  config = _read(d / "config.json")
  if not config:
    raise ConfigError(f"{d} has no config.json: not a Hugging Face checkpoint directory")
  if not any(d.glob("*.safetensors")):
    raise ConfigError(f"{d} has no *.safetensors files")
  arch = architecture_from_hf_config(config)
  name = name or d.name.lower()
  tokenizer: dict = {}
  if (d / "tokenizer.json").is_file():
    tokenizer = {"kind": "tokenizer.json", "path": str(d / "tokenizer.json")}
  elif (d / "tokenizer.model").is_file():
    tokenizer = {"kind": "sentencepiece", "path": str(d / "tokenizer.model")}
  else:
    tokenizer = {"kind": "bytes"}
  template = _read(d / "tokenizer_config.json").get("chat_template") or ""
  if "<|im_start|>" in str(template):
    tokenizer["chat_template"] = "chatml"
  elif "<start_of_turn>" in str(template):
    tokenizer["chat_template"] = "gemma"
  tokenizer["stop_ids"] = _stop_ids(_read(d / "generation_config.json"), config)
  lines = [f"# Made by `flying-jax card --from-hf {d}`.", f"name = {toml_value(name)}",
           f"description = {toml_value(config.get('_name_or_path') or d.name)}", "", "[architecture]"]
  lines += [f"{k} = {toml_value(v)}" for k, v in dataclasses.asdict(arch).items()]
  lines += ["", "[weights]", 'format = "safetensors"', f"path = {toml_value(str(d))}", "",
            "[tokenizer]"]
  lines += [f"{k} = {toml_value(v)}" for k, v in tokenizer.items()]
  return "\n".join(lines) + "\n"


def run_card(args) -> int:
  """`flying-jax card --from-hf DIR [--name N] [--output FILE]`."""
  import sys

  from flying_jax.config import ConfigError

  try:
    text = card_from_hf(args.from_hf, args.name)
  except (ConfigError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.output:
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}; use it with --model {out} (or put it in a --models-dir folder)",
          file=sys.stderr)
  else:
    print(text, end="")
  return 0

"""Chat templates: a list of `{"role", "content"}` messages rendered as the model's prompt text.

Three formats, picked by the model card's `[tokenizer] chat_template`:

- `"chatml"` (SmolLM2, Qwen): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then
  `<|im_start|>assistant\\n` when a generation prompt is asked for.
- `"llama2"`: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>...`,
  with the tokenizer's own BOS/EOS strings; after an optional system message, turns alternate
  user/assistant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ROLES = ("system", "user", "assistant")


def validate(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
  """`messages` as `(role, content)` pairs, or a ValueError saying which message is malformed."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise ValueError("messages must be a list of {'role', 'content'} dicts, "
                     f"got {type(messages).__name__}")
  if not messages:
    raise ValueError("messages is empty")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise ValueError(
          f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
      raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
      raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
    out.append((role, content))
  return out


def chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
  """ChatML text of `messages`."""
  pairs = validate(messages)
  text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in pairs)
  return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def llama2(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
           bos: str = "<s>", eos: str = "</s>") -> str:
  """Llama-2 chat text of `messages` (the generation prompt is implicit after a user turn)."""
  pairs = validate(messages)
  system = None
  if pairs[0][0] == "system":
    system, pairs = pairs[0][1], pairs[1:]
  text = ""
  for i, (role, content) in enumerate(pairs):
    expected = "user" if i % 2 == 0 else "assistant"
    if role != expected:
      raise ValueError(f"llama2 chat: message {i + (system is not None)} must be {expected!r} "
                       "(a system message may only come first, then user/assistant alternate)")
    if role == "user":
      if i == 0 and system is not None:
        content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
      text += f"{bos}[INST] {content.strip()} [/INST]"
    else:
      text += f" {content.strip()} {eos}"
  if not pairs:
    raise ValueError("llama2 chat: at least one user message is needed")
  if add_generation_prompt and pairs[-1][0] != "user":
    raise ValueError("llama2 chat: a generation prompt must follow a user message")
  return text


def gemma(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
          bos: str = "<bos>") -> str:
  """Gemma chat text of `messages`."""
  pairs = validate(messages)
  system = None
  if pairs[0][0] == "system":
    system, pairs = pairs[0][1], pairs[1:]
  text = bos
  for i, (role, content) in enumerate(pairs):
    if role == "system":
      raise ValueError(f"gemma chat: message {i + (system is not None)}: a system message may "
                       "only come first")
    if i == 0 and system is not None:
      content = f"{system}\n\n{content}"
    who = "model" if role == "assistant" else "user"
    text += f"<start_of_turn>{who}\n{content.strip()}<end_of_turn>\n"
  return text + ("<start_of_turn>model\n" if add_generation_prompt else "")


def render(template: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
           bos: str | None = None, eos: str | None = None) -> str:
  """Render `messages` with the named template (`"chatml"`, `"llama2"` or `"gemma"`); `bos` /
  `eos`: the tokenizer's own strings (default: the template's usual ones)."""
  if template == "chatml":
    return chatml(messages, add_generation_prompt)
  if template == "llama2":
    return llama2(messages, add_generation_prompt, bos=bos or "<s>", eos=eos or "</s>")
  if template == "gemma":
    return gemma(messages, add_generation_prompt, bos=bos or "<bos>")
  raise ValueError(f"unknown chat template {template!r}; known: chatml, llama2, gemma")

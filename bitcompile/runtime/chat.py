"""Chat templates as Hugging Face defines them, and the generation defaults a checkpoint ships.

`tokenizer_config.json`'s `chat_template` is a Jinja2 template over `messages` (role/content dicts),
`bos_token`, `eos_token` and `add_generation_prompt`; it is rendered in Jinja2's immutable sandbox,
as transformers renders it (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`).
`generation_config.json` adds end-of-sequence ids (`eos_token_id`: an int or a list) and default
`temperature` / `top_p`. `bitcompile compile` copies both files into the artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """Messages the template cannot take, or a model without a chat template."""


def _special(value) -> str:
    """A special token in tokenizer_config.json: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ChatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class ChatTemplate:
    """A model's chat template; Jinja2 is imported and the template compiled when first rendered (a
    device that only completes text never needs it)."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        self.source, self.bos_token, self.eos_token = template, bos_token, eos_token
        self._compiled = None

    def _template(self):
        if self._compiled is None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ChatError(f"the chat template refused the messages: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
            try:
                self._compiled = env.from_string(self.source)
            except TemplateError as e:
                raise ChatError(f"the model's chat template does not parse: {e}") from None
        return self._compiled

    @classmethod
    def from_dir(cls, directory: Path) -> ChatTemplate | None:
        """The template of tokenizer_config.json in `directory`; None when there is none."""
        config = _read_json(directory / "tokenizer_config.json")
        template = config.get("chat_template")
        for key in ("bos_token", "eos_token"):
            if config.get(key) is not None and not isinstance(config[key], (str, dict)):
                raise ChatError(f"{directory / 'tokenizer_config.json'}: '{key}' is {config[key]!r}; expected a string")
        if template is not None and not isinstance(template, (str, list)):
            raise ChatError(f"{directory / 'tokenizer_config.json'}: 'chat_template' is {template!r}; expected a "
                            "Jinja2 template string")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if not isinstance(template, str) or not template:
            return None
        return cls(template, _special(config.get("bos_token")), _special(config.get("eos_token")))

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        check_messages(messages)
        try:
            return self._template().render(messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                                        add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise ChatError(f"the chat template failed on these messages: {e}") from None


def check_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise ChatError(f"messages[{i}].role is {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ChatError(f"messages[{i}].content must be a string")


def generation_defaults(directory: Path, vocab_size: int) -> tuple[list[int], dict]:
    """(end-of-sequence ids, default sampling {temperature, top_p}) from generation_config.json."""
    config = _read_json(directory / "generation_config.json")
    eos = config.get("eos_token_id", [])
    eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if not isinstance(eos, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                                            for t in eos):
        raise ChatError(f"{directory / 'generation_config.json'}: eos_token_id must be a token id or a list of "
                        f"token ids in 0..{vocab_size - 1}, got {config.get('eos_token_id')!r}")
    defaults = {}
    for key, high in (("temperature", 100.0), ("top_p", 1.0)):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high \
                or (key == "top_p" and value == 0):
            raise ChatError(f"{directory / 'generation_config.json'}: '{key}' is {value!r}; expected a number in "
                            f"{'(0' if key == 'top_p' else '[0'}, {high:g}]")
        defaults[key] = float(value)
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return eos, defaults

"""Chat templates with the semantics of transformers' ``apply_chat_template``.

The template comes from the checkpoint: ``chat_template.jinja``, else ``tokenizer_config.json``'s
``chat_template`` (a string, or a list of named templates: "default" is used). It is rendered in
jinja2's ImmutableSandboxedEnvironment with transformers' settings (trim_blocks, lstrip_blocks, the
loopcontrols extension) and helpers (``raise_exception``, ``tojson`` without ASCII escaping,
``strftime_now``), with ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
# End-of-turn markers of common chat formats; those the vocabulary has also end a chat reply.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


class TemplateError(ValueError):
    """The template is missing, unreadable, or raised while rendering (a 400 for the request)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):  # {"content": "<s>", "lstrip": false, ...}
        v = v.get("content")
    return v if isinstance(v, str) else None


@dataclass
class ChatTemplate:
    source: str
    bos_token: str | None = None
    eos_token: str | None = None

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template does not compile: {e}") from None

    @classmethod
    def load(cls, model_dir: str) -> ChatTemplate:
        """The checkpoint's template; TemplateError naming the files looked at if there is none."""
        cfg: dict[str, Any] = {}
        cfg_path = os.path.join(model_dir, CONFIG_FILE)
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        source: Any = None
        jinja_path = os.path.join(model_dir, TEMPLATE_FILE)
        if os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                source = f.read()
        else:
            source = cfg.get("chat_template")
            if isinstance(source, list):
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
        if not isinstance(source, str) or not source:
            raise TemplateError(
                f"this model has no chat template: neither {TEMPLATE_FILE} nor a 'chat_template' in "
                f"{CONFIG_FILE} was found in the checkpoint; use /v1/completions instead"
            )
        return cls(source, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise TemplateError(f"the chat template failed on these messages: {e}") from None

    def stop_token_ids(self, tokenizer: Any) -> tuple[int, ...]:
        """Token ids that end a reply: the template's eos token and known end-of-turn markers."""
        names = [t for t in (self.eos_token, *END_OF_TURN_TOKENS) if t]
        ids = (tokenizer.token_to_id(t) for t in names) if tokenizer is not None else ()
        return tuple(dict.fromkeys(i for i in ids if i is not None))

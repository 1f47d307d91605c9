"""One way in for both checkpoint formats: a Hugging Face directory (config.json + safetensors)
or a GGUF file (a .gguf path, or a directory holding exactly one)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import ModelConfig
from .gguf_checkpoint import GGUFFile, gguf_path, load_gguf_weights
from .loader import LoadReport, load_weights


@dataclass
class Checkpoint:
    path: str  # what --model named
    config: ModelConfig
    gguf: GGUFFile | None = None  # open until the weights are loaded, then dropped

    @classmethod
    def open(cls, model: str) -> Checkpoint:
        found = gguf_path(model)
        if found is None:
            return cls(model, ModelConfig.from_pretrained(model))
        f = GGUFFile.open(found)
        return cls(model, ModelConfig.from_dict(f.config_dict()), f)

    @property
    def gguf_path(self) -> str | None:
        """The .gguf file this checkpoint was read from (None: a Hugging Face directory)."""
        return gguf_path(self.path)

    @property
    def name(self) -> str:
        """The default served model name: the directory's or the file's, without .gguf."""
        base = os.path.basename(os.path.normpath(self.path))
        return base.removesuffix(".gguf")

    def load_weights(self, model: torch.nn.Module, rank: int, tp: int) -> LoadReport:
        if self.gguf is None:
            return load_weights(model, self.path, self.config, rank, tp)
        return load_gguf_weights(model, self.gguf, self.config, rank, tp)

    def tokenizer(self) -> Any:
        """A `tokenizers.Tokenizer`, or None when the checkpoint has no tokenizer."""
        if self.gguf is not None:
            from .gguf_tokenizer import build_tokenizer

            return build_tokenizer(self.gguf.fields, self.gguf.path)
        tok_path = os.path.join(self.path, "tokenizer.json")
        if not os.path.exists(tok_path):
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(tok_path)

    def chat_template(self) -> str | None:
        """The Jinja chat template: GGUF metadata, else tokenizer_config.json / chat_template.jinja."""
        if self.gguf is not None:
            return self.gguf.chat_template
        jinja = os.path.join(self.path, "chat_template.jinja")
        if os.path.exists(jinja):
            with open(jinja) as f:
                return f.read()
        tc = os.path.join(self.path, "tokenizer_config.json")
        if os.path.exists(tc):
            with open(tc) as f:
                value = json.load(f).get("chat_template")
            return value if isinstance(value, str) else None
        return None

    def extra_eos_ids(self) -> list[int]:
        """eos ids beyond config.json's: generation_config.json's (GGUF: none beyond the metadata)."""
        gen_cfg = os.path.join(self.path, "generation_config.json")
        if self.gguf is not None or not os.path.exists(gen_cfg):
            return []
        with open(gen_cfg) as f:
            g = json.load(f).get("eos_token_id")
        return [int(e) for e in (g if isinstance(g, list) else ([] if g is None else [g]))]

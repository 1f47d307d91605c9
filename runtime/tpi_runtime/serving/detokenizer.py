"""Incremental detokenization with stop strings, O(1) per token.

Each step decodes only a short window: the tokens since the last released text plus the run of
tokens before it (``prefix``), the way vLLM's ``detokenize_incrementally`` does. Decoding with the
previous tokens in front keeps a word's leading space (SentencePiece drops it at the start of a
decode) and lets byte-fallback or byte-level pieces of one character accumulate until the character
is complete, so a delta never ends in U+FFFD. Streaming and non-streaming requests both concatenate
the deltas, so their texts are identical by construction.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 4  # prompt tokens decoded in front of the first generated one
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Token ids in, text deltas out; holds back what a stop string could still claim."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []  # generated ids
        self.text = ""  # decoded so far (cut at a stop string once one matched)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False
        self._window = list(prompt_ids[-_CONTEXT_TOKENS:]) if tokenizer is not None else []
        self._prefix = 0  # window[:_read] is decoded; window[_prefix:_read] is the context run
        self._read = len(self._window)
        self._hold = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _step_text(self, final: bool) -> str:
        if self.tokenizer is None or self._read == len(self._window):
            return ""
        prefix_text = self._decode(self._window[self._prefix : self._read])
        new_text = self._decode(self._window[self._prefix :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        delta = new_text[len(prefix_text) :]
        # Keep only the run since the previous release: the window stays a few tokens long.
        drop = self._read
        self._window = self._window[drop:]
        self._prefix, self._read = 0, len(self._window)
        return delta

    def add(self, token_id: int) -> str:
        """Add one token; returns the text that may be released now. Sets ``stopped`` on a stop match."""
        self.ids.append(token_id)
        self._window.append(token_id)
        before = len(self.text)
        self.text += self._step_text(final=False)
        return self._after_append(before)

    def finish(self) -> str:
        """Release everything still held back (generation ended without a stop string)."""
        if not self.stopped:
            before = len(self.text)
            self.text += self._step_text(final=True)
            self._after_append(before)
        return self._release(len(self.text))

    def _after_append(self, before: int) -> str:
        if self.stop:
            start = max(0, before - self._hold)  # only the new text can complete a stop string
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[: min(hits)]
                return self._release(len(self.text))
        safe = len(self.text)
        if self._hold:
            for k in range(min(self._hold, safe - self.emitted), 0, -1):
                tail = self.text[safe - k : safe]
                if any(s.startswith(tail) for s in self.stop):
                    safe -= k
                    break
        return self._release(safe)

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

"""Decoding settings: :class:`GenerationConfig`, checked at construction, and keyword options."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class GenerationConfig:
    """Decoding settings, checked at construction.

    Attributes:
        max_new_tokens: most tokens generated per row (>= 1).
        temperature: 0 is greedy decoding (top-k and top-p then change nothing); > 0 samples from
            ``softmax(logits / temperature)``.
        top_k: keep the ``k`` most likely tokens (0 = off).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (1 = off); must lie in (0, 1].
        repetition_penalty: CTRL's penalty ``theta`` on tokens this reply already generated
            (positive logits divided, negative ones multiplied); 1 = off. The prompt is not
            penalised: it holds the template's ``<|im_end|>`` and the question's words, and
            penalising those would stop a chat model from ending its turn or naming what it was
            asked about.
        stop_strings: stop a row once its text contains one of these; the text is cut before it.
        seed: seeds the sampler for reproducible sampling (None: the global torch RNG).
        compile: run decode steps through ``torch.compile`` with a cache of the model's full
            ``max_seq_len``, so every prompt length reuses one compiled graph.
        compile_backend, compile_mode: passed to ``torch.compile`` (``"eager"`` or
            ``"aot_eager"`` check capture cheaply on CPU; ``mode="reduce-overhead"`` adds CUDA
            graphs).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, list):
            self.stop_strings = tuple(self.stop_strings)
        self.validate()

    def validate(self) -> GenerationConfig:
        """Raise ValueError naming the first invalid field; return self."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}")
        if isinstance(self.stop_strings, str) or not isinstance(self.stop_strings, tuple):
            raise ValueError(f"stop_strings must be a tuple of strings, e.g. ('###',); got {self.stop_strings!r}")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


GENERATION_OPTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def generation_config(config: GenerationConfig | None = None, **options: Any) -> GenerationConfig:
    """``config`` (default settings when None) with keyword ``options`` applied and checked.

    Raises:
        ValueError: an unknown option name (the known ones are listed) or an invalid value.
    """
    unknown = sorted(set(options) - set(GENERATION_OPTIONS))
    if unknown:
        raise ValueError(f"unknown generation option(s) {unknown}; expected some of {list(GENERATION_OPTIONS)}")
    return dataclasses.replace(config or GenerationConfig(), **options)

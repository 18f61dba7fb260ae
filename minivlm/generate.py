"""Text generation: greedy and sampled decoding over a pre-allocated (static) KV cache.

The prompt, images included, is prefilled once; each decode step then feeds one token per row.
Prompts of different lengths are left-padded so every row's next token is in the last column;
positions count real tokens only, so a padded prompt decodes exactly like an unpadded one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    """Decoding settings. ``temperature == 0`` is greedy (top-k/top-p then do nothing)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> "GenerationConfig":
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        return self


def process_logits(logits: Tensor, history: Tensor | None, cfg: GenerationConfig) -> Tensor:
    """Repetition penalty (CTRL, Keskar et al. 2019), temperature, top-k, top-p (Holtzman et al. 2020).

    ``logits [B, V]``, ``history [B, L]`` token ids seen so far (prompt + generated, -1 = none).
    Returns processed logits; filtered entries are ``-inf``.
    """
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = torch.zeros_like(logits, dtype=torch.bool)
        valid = history >= 0
        seen.scatter_(1, history.clamp_min(0), valid)
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if cfg.temperature == 0:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass *before* it already reaches top_p (keeps at least one).
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per row, EOS / stop excluded
    texts: list[str] | None = None
    finish_reasons: list[str] = field(default_factory=list)  # "eos" | "stop_string" | "length"


def stream_tokens(model, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                  config: GenerationConfig | None = None, eos_ids: Sequence[int] = ()) -> Iterator[Tensor]:
    """Yield the next token of every row, ``[B]``, one decode step at a time.

    Rows keep producing tokens after their EOS; callers (``generate``) stop reading them. The
    iterator can be abandoned at any point: the model holds no decoding state (the cache is
    local), so an interrupted stream leaves it usable.
    """
    cfg = (config or GenerationConfig()).validate()
    B, T = input_ids.shape
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.to(device).bool()
    max_len = T + cfg.max_new_tokens
    if max_len > model.config.decoder.max_seq_len:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({cfg.max_new_tokens}) = {max_len} exceeds the "
                         f"model's context of {model.config.decoder.max_seq_len} tokens")
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    dtype = next(model.parameters()).dtype
    cache = model.decoder.new_cache(B, max_len, dtype=dtype, device=device)
    history = input_ids.masked_fill(~attention_mask, -1)
    mask = attention_mask
    with torch.no_grad():
        out = model(input_ids, pixel_values=pixel_values, attention_mask=mask, cache=cache, return_logits=False)
        logits = model.decoder.logits(out.hidden[:, -1])
        for _ in range(cfg.max_new_tokens):
            nxt = pick_tokens(process_logits(logits, history, cfg), cfg, generator)
            yield nxt
            history = torch.cat([history, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
            if cache.pos >= max_len:
                break
            out = model(nxt[:, None], attention_mask=mask, cache=cache, return_logits=False)
            logits = model.decoder.logits(out.hidden[:, -1])


def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
             config: GenerationConfig | None = None, eos_ids: Sequence[int] = (), tokenizer: Any = None) -> GenerationOutput:
    """Decode every row until EOS, a stop string (needs ``tokenizer``) or ``max_new_tokens``."""
    cfg = (config or GenerationConfig()).validate()
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    B = input_ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    eos = set(eos_ids)
    for step in stream_tokens(model, input_ids, attention_mask, pixel_values, cfg, eos_ids):
        for b, t in enumerate(step.tolist()):
            if reasons[b] is not None:
                continue
            if t in eos:
                reasons[b] = "eos"
                continue
            tokens[b].append(t)
            if cfg.stop_strings:
                text = tokenizer.decode(tokens[b], skip_special_tokens=True)
                if any(s in text for s in cfg.stop_strings):
                    reasons[b] = "stop_string"
        if all(r is not None for r in reasons):
            break
    texts = None
    if tokenizer is not None:
        texts = [_cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), cfg.stop_strings) for t in tokens]
    return GenerationOutput(tokens, texts, [r or "length" for r in reasons])


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]


# ---- chat-level API ------------------------------------------------------------------------------

def _processor_of(model, processor=None):
    processor = processor or getattr(model, "processor", None)
    if processor is None:
        raise ValueError("this model has no processor attached; pass processor= or load a checkpoint that has one")
    return processor


def chat_batch(model, conversations: Sequence[list[dict]], processor=None, **generation: Any) -> list[str]:
    """Answer a batch of conversations (HF chat format); returns the assistant texts."""
    processor = _processor_of(model, processor)
    cfg = replace(GenerationConfig(), **generation).validate()  # validate before any compute
    batch = processor(list(conversations), add_generation_prompt=True, padding_side="left")
    tok = processor.tokenizer
    pixels = batch.get("pixel_values")
    out = generate(model, batch["input_ids"], batch["attention_mask"],
                   pixels.to(model.device) if pixels is not None else None, cfg,
                   eos_ids=[i for i in (tok.im_end_id, tok.eos_id) if i is not None], tokenizer=tok)
    return [t.strip() for t in out.texts]


def chat(model, messages: list[dict], processor=None, **generation: Any) -> str:
    """One conversation in, the assistant's reply out (multi-turn: earlier images are kept)."""
    return chat_batch(model, [messages], processor, **generation)[0]


def chat_stream(model, messages: list[dict], processor=None, **generation: Any) -> Iterator[str]:
    """Yield the reply as text pieces as they are generated (batch of one)."""
    processor = _processor_of(model, processor)
    cfg = replace(GenerationConfig(), **generation).validate()
    batch = processor([messages], add_generation_prompt=True, padding_side="left")
    tok = processor.tokenizer
    eos = {i for i in (tok.im_end_id, tok.eos_id) if i is not None}
    pixels = batch.get("pixel_values")
    tokens: list[int] = []
    emitted = ""
    for step in stream_tokens(model, batch["input_ids"], batch["attention_mask"],
                              pixels.to(model.device) if pixels is not None else None, cfg):
        t = int(step[0])
        if t in eos:
            break
        tokens.append(t)
        text = _cut_at_stop(tok.decode(tokens, skip_special_tokens=True), cfg.stop_strings)
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
        if cfg.stop_strings and any(s in tok.decode(tokens, skip_special_tokens=True) for s in cfg.stop_strings):
            break

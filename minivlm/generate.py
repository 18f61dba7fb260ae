"""Text generation over a pre-allocated (static) KV cache: decoding, streaming, chat, scoring.

Decoding has two phases, as in gpt-fast:

* **prefill**: one :class:`~minivlm.model.VisionLanguageModel` forward over the whole prompt.
  Images are encoded here and only here; their keys stay in the KV cache (splice and prefix
  fusion) or on ``cache.cross_context`` (cross-attention fusion).
* **decode**: :func:`decode_step` feeds one token per row. Its shapes never change: the new key
  and value are written at a column given as a tensor, and attention runs over the whole
  ``max_len`` buffer under a validity mask, so ``torch.compile`` (and CUDA graphs) capture one
  graph that serves every step (``GenerationConfig(compile=True)``).

Prompts of different lengths are left-padded so every row's next token comes from the last
column; positions count real tokens only, so a padded row decodes exactly as the same prompt
alone. Sampling follows the usual order (Hugging Face ``generate``): repetition penalty (CTRL,
Keskar et al. 2019), temperature, top-k (Fan et al. 2018), top-p (nucleus, Holtzman et al. 2020).

The chat layer (:func:`chat`, :func:`chat_batch`, :func:`chat_stream`, :class:`ChatSession`)
takes conversations in the Hugging Face message format (system / user / assistant; text, images,
video) and renders them with the model's :class:`~minivlm.text.processor.Processor`.
:func:`continuation_logprobs` and :func:`logprob_fn` score given answers instead of generating
them, for multiple-choice evaluation (:mod:`minivlm.eval.choice`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from minivlm.layers.attention import AttentionMask
from minivlm.layers.kv_cache import StaticKVCache

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, Any]]


# ---- settings -------------------------------------------------------------------------------------
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


# ---- logits processing ----------------------------------------------------------------------------
def process_logits(logits: Tensor, config: GenerationConfig, seen: Tensor | None = None) -> Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to next-token logits.

    Args:
        logits: ``[B, V]`` raw next-token logits.
        config: the settings; with ``temperature == 0`` only the repetition penalty applies.
        seen: ``[B, V]`` bool, tokens the repetition penalty applies to (None: no penalty).

    Returns:
        ``[B, V]`` float32 logits; tokens removed by top-k / top-p are ``-inf``.
    """
    logits = logits.float()
    if config.repetition_penalty != 1.0 and seen is not None:
        # CTRL (Keskar et al. 2019, eq. 2) divides by theta; dividing a negative logit would
        # *raise* it, so negative logits are multiplied instead (the Hugging Face convention).
        penalised = torch.where(logits > 0, logits / config.repetition_penalty, logits * config.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if config.temperature == 0:
        return logits
    logits = logits / config.temperature
    if config.top_k > 0:
        kth_best = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass of the tokens before it already reaches top_p: the most
        # likely token always survives, and the kept set is the smallest reaching top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None = None) -> Tensor:
    """``[B, V]`` processed logits -> ``[B]`` token ids: argmax when greedy, else a sample."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- the static cache and the decode step -----------------------------------------------------------
class DecodeCache(StaticKVCache):
    """A :class:`StaticKVCache` whose decode steps have fixed shapes.

    The prefill writes through :meth:`StaticKVCache.update` (positions ``[pos, pos + T)``, the
    valid prefix returned). :meth:`start_decoding` then switches to fixed-shape writes: each
    step writes its key/value at column ``write_index`` (a ``[1]`` long tensor, so a compiled
    step reads it as data rather than specialising on it) and attends over the whole
    ``[B, Hkv, max_len, Dh]`` buffer; unwritten columns are masked out by the step's
    ``key_valid``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.write_index: Tensor | None = None

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> DecodeCache:
        d = model.config.decoder
        return cls(d.n_layers, batch, d.n_kv_heads, max_len, d.resolved_head_dim,
                   dtype=model.decoder.embed.weight.dtype, device=model.device)

    @property
    def decoding(self) -> bool:
        return self.write_index is not None

    def start_decoding(self) -> None:
        """Switch to fixed-shape decode writes, continuing at the current position."""
        if self.pos >= self.max_len:
            raise ValueError(f"the cache is full ({self.max_len} positions); no room for a decode step")
        self.write_index = torch.tensor([self.pos], device=self.k.device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if not self.decoding:
            return super().update(layer, k, v)
        self.k[layer].index_copy_(2, self.write_index, k)
        self.v[layer].index_copy_(2, self.write_index, v)
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        # A decode step must not touch Python state (a compiled step would specialise on it);
        # the loop moves to the next column with next_column() outside the step.
        if not self.decoding:
            super().advance(n)

    def next_column(self) -> None:
        self.pos += 1
        self.write_index += 1

    def reset(self) -> None:
        super().reset()
        self.write_index = None


def prefill(model, cache: DecodeCache, input_ids: Tensor, attention_mask: Tensor,
            pixel_values: Tensor | None) -> Tensor:
    """Run the prompt (and encode its images, once) into ``cache``; return the last column's logits.

    ``input_ids, attention_mask [B, T]`` left-padded, ``pixel_values [N, C, H, W]`` or None.
    Returns ``[B, V]`` float32 next-token logits; the cache is left in decode mode.
    """
    out = model(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, cache=cache,
                return_logits=False)
    cache.start_decoding()
    return model.decoder.logits(out.hidden[:, -1]).float()


def decode_step(model, cache: DecodeCache, tokens: Tensor, positions: Tensor, key_valid: Tensor) -> Tensor:
    """One new token per row through the decoder against the static cache.

    Every shape is fixed for a given cache, and no Python value changes between steps, so
    ``torch.compile`` captures it once (one graph for splice and prefix fusion).

    Args:
        model: a :class:`~minivlm.model.VisionLanguageModel`.
        cache: a :class:`DecodeCache` after :func:`prefill`; this step writes column
            ``cache.write_index`` of every layer.
        tokens: ``[B]`` the newest token of each row.
        positions: ``[B]`` its rotary position (real tokens before it, padding excluded).
        key_valid: ``[B, max_len]`` bool, the cache columns holding real tokens; this step's
            column is set in place.

    Returns:
        ``[B, V]`` float32 next-token logits.
    """
    key_valid.index_fill_(1, cache.write_index, True)
    ids = tokens[:, None]
    # The query is newer than every buffer column, so a causal mask placed at the buffer's last
    # slot allows them all and key_valid does the masking. The non-zero offset also keeps
    # dispatch on SDPA, which takes one query without recompiling (FlexAttention would not).
    mask = AttentionMask(causal=True, q_offset=cache.max_len - 1, key_valid=key_valid)
    embeds = model.decoder.embed(ids)
    layer_hook = None
    if cache.cross_context is not None:
        # Cross-attention fusion reads the prefill's image keys from the cache. Splice and prefix
        # fusion keep no such state: a decode token is never an image, so they would return its
        # embedding unchanged, and skipping them keeps their placeholder count check (a host
        # sync) out of the compiled graph.
        fused = model.fusion(embeds, None, ids, mask, cache)
        embeds, mask, layer_hook = fused.embeds, fused.mask, fused.layer_hook
    hidden = model.decoder(embeds, mask, positions[:, None], cache, layer_hook)
    return model.decoder.logits(hidden[:, -1]).float()


@functools.lru_cache(maxsize=None)
def compiled_decode_step(backend: str = "inductor", mode: str | None = None) -> Callable[..., Tensor]:
    """:func:`decode_step` through ``torch.compile`` (one wrapper per backend and mode)."""
    options: dict[str, Any] = {"backend": backend, "dynamic": False}
    if mode is not None:
        options["mode"] = mode
    return torch.compile(decode_step, **options)


# ---- token streams and generate ----------------------------------------------------------------------
def check_prompt(model, input_ids: Tensor, attention_mask: Tensor | None, pixel_values: Tensor | None,
                 config: GenerationConfig) -> Tensor:
    """Validate a generation prompt before any compute; return the boolean attention mask.

    Raises:
        ValueError: ids not ``[B, T]`` integers, a mask of another shape or not left-padded, a
            prompt that leaves no room for ``max_new_tokens`` in the model's context, or image
            placeholders that do not match ``pixel_values``.
    """
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [B, T]; got {_describe(input_ids)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids must hold at least one token per row; got shape {list(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must match input_ids {list(input_ids.shape)}; got {_describe(attention_mask)}")
    attention_mask = attention_mask.bool()
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generation needs left-padded prompts (padding_side='left'): the last column of "
                         "attention_mask must be 1 in every row")
    context = model.config.decoder.max_seq_len
    if T + config.max_new_tokens > context:
        raise ValueError(f"a prompt of {T} tokens plus max_new_tokens={config.max_new_tokens} exceeds the model's "
                         f"context of {context} tokens; shorten the prompt (fewer images or turns) or lower "
                         f"max_new_tokens")
    n_views = 0 if pixel_values is None else pixel_values.shape[0]
    per_view = model.config.image_seq_len
    found = int((input_ids == model.config.image_token_id).sum())
    if found != n_views * per_view:
        raise ValueError(f"input_ids hold {found} image placeholder tokens but {n_views} image views x {per_view} "
                         f"tokens = {n_views * per_view} were given")
    return attention_mask


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def stream_tokens(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                  pixel_values: Tensor | None = None, config: GenerationConfig | None = None,
                  text_vocab: int | None = None) -> Iterator[Tensor]:
    """The next token of every row, ``[B]``, one decode step at a time.

    Arguments are checked here, before any compute (:func:`check_prompt`); the model runs as the
    iterator is consumed. Rows keep producing tokens after their end-of-turn token: callers stop
    reading them (:func:`generate`). The cache lives in the iterator, and gradients are disabled
    only while it computes, never across a ``yield``: abandoning it at any point leaves the model
    and the caller's autograd state as they were.

    Args:
        input_ids: ``[B, T]`` left-padded prompt ids with image placeholders.
        attention_mask: ``[B, T]``, 0 on padding (None: no padding).
        pixel_values: ``[N, C, H, W]`` the views of every placeholder run, in order.
        config: decoding settings.
        text_vocab: the tokenizer's vocabulary size; ids from it up to the model's (padded)
            vocabulary are never generated: no tokenizer could decode them.
    """
    config = (config or GenerationConfig()).validate()
    attention_mask = check_prompt(model, input_ids, attention_mask, pixel_values, config)
    return _decode(model, input_ids, attention_mask, pixel_values, config, text_vocab)


def _decode(model, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
            config: GenerationConfig, text_vocab: int | None = None) -> Iterator[Tensor]:
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    B, T = input_ids.shape
    # A compiled step needs one cache length for every prompt; eager decoding sizes it to fit.
    max_len = model.config.decoder.max_seq_len if config.compile else T + config.max_new_tokens
    cache = DecodeCache.for_model(model, B, max_len)
    key_valid = torch.zeros(B, max_len, dtype=torch.bool, device=device)
    step = decode_step
    if config.compile:
        # CUDA graphs replay fixed addresses: the buffers each step writes in place must stay put
        # (inputs mutated at unmarked addresses make inductor skip CUDA graphs).
        for buffer in (cache.k, cache.v, key_valid):
            torch._dynamo.mark_static_address(buffer)
        step = compiled_decode_step(config.compile_backend, config.compile_mode)
    generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
    vocab = model.config.decoder.vocab_size
    with torch.no_grad():
        logits = prefill(model, cache, input_ids, attention_mask, pixel_values)
        key_valid[:, :T] = attention_mask
        positions = attention_mask.long().sum(dim=1)  # the first new token follows the real ones
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=device) if config.repetition_penalty != 1 else None
        # An image placeholder without an image breaks the fusion's bookkeeping: never generate one.
        suppress = torch.zeros(vocab, dtype=torch.bool, device=device)
        suppress[model.config.image_token_id] = True
        if text_vocab is not None:
            suppress[text_vocab:] = True  # rows padding a published model's vocabulary have no token
    for index in range(config.max_new_tokens):
        with torch.no_grad():
            tokens = pick_tokens(process_logits(logits.masked_fill(suppress, float("-inf")), config, seen),
                                 config, generator)
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
        yield tokens
        if index == config.max_new_tokens - 1:
            return
        with torch.no_grad():
            logits = step(model, cache, tokens, positions, key_valid)
            cache.next_column()
            positions = positions + 1


@dataclass
class GenerationOutput:
    """What :func:`generate` returns, one entry per row.

    tokens: the new tokens, end-of-turn excluded; a stop string's tokens included.
    texts: decoded replies cut before the first stop string (None without a tokenizer).
    finish_reasons: ``"eos"``, ``"stop_string"`` or ``"length"``.
    """

    tokens: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]


class ReplyText:
    """The text of one reply as its tokens arrive, cut before the first stop string.

    :meth:`stable_text` is what a stream may show already: it holds back a trailing incomplete
    UTF-8 character (decoded as U+FFFD until its last byte arrives) and a trailing piece that
    could be the start of a stop string, so what has been shown is always a prefix of the
    final :meth:`text`.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.tokens: list[int] = []
        self._decoded = ""

    def add(self, token: int) -> bool:
        """Append a token; True once the text contains a stop string."""
        self.tokens.append(token)
        self._decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return any(s in self._decoded for s in self.stop_strings)

    def text(self) -> str:
        cut = min((self._decoded.find(s) for s in self.stop_strings if s in self._decoded), default=len(self._decoded))
        return self._decoded[:cut]

    def stable_text(self) -> str:
        text = self.text().rstrip("\ufffd")
        held = max((n for s in self.stop_strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[: len(text) - held]


def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
             config: GenerationConfig | None = None, *, eos_ids: Sequence[int] = (), tokenizer: Any = None
             ) -> GenerationOutput:
    """Decode every row until an ``eos_ids`` token, a stop string (needs ``tokenizer``) or ``max_new_tokens``.

    Args:
        input_ids, attention_mask, pixel_values, config: as :func:`stream_tokens`.
        eos_ids: tokens that end a row (not included in its output).
        tokenizer: decodes the replies (``texts``) and finds stop strings.
    """
    config = (config or GenerationConfig()).validate()
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    stream = stream_tokens(model, input_ids, attention_mask, pixel_values, config,
                           len(tokenizer) if tokenizer is not None else None)
    B = input_ids.shape[0]
    replies = [ReplyText(tokenizer, config.stop_strings) if tokenizer is not None else None for _ in range(B)]
    tokens: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    eos = set(eos_ids)
    with closing(stream):
        for step in stream:
            for row, token in enumerate(step.tolist()):
                if reasons[row] is not None:
                    continue
                if token in eos:
                    reasons[row] = "eos"
                    continue
                tokens[row].append(token)
                if replies[row] is not None and replies[row].add(token):
                    reasons[row] = "stop_string"
            if all(r is not None for r in reasons):
                break
    texts = [r.text() for r in replies] if tokenizer is not None else None
    return GenerationOutput(tokens, texts, [r or "length" for r in reasons])


# ---- chat ------------------------------------------------------------------------------------------
def processor_of(model, processor=None):
    """The processor to render conversations with: the given one, else the model's own."""
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None:
        raise ValueError("this model has no processor attached; pass processor= or load a checkpoint "
                         "directory that holds processor_config.json")
    return processor


def _eos_ids(tokenizer) -> list[int]:
    return [i for i in (tokenizer.im_end_id, tokenizer.eos_id) if i is not None]


def _render(model, conversations: Sequence[Messages], processor) -> dict[str, Any]:
    """Left-padded generation prompts; unreadable media and over-long prompts raise here."""
    if isinstance(conversations, (str, Mapping)) or not isinstance(conversations, Sequence):
        raise ValueError(f"expected a list of conversations, got {type(conversations).__name__}")
    return processor(list(conversations), add_generation_prompt=True, padding_side="left")


def chat_batch(model, conversations: Sequence[Messages], *, processor=None, config: GenerationConfig | None = None,
               **options: Any) -> list[str]:
    """Answer each conversation; returns the assistant replies, whitespace-stripped.

    Args:
        conversations: each a message list in the Hugging Face chat format (``system`` /
            ``user`` / ``assistant``; content a string or text / image / video items). Earlier
            turns, their images included, are part of every prompt.
        processor: renders the conversations (default: ``model.processor``).
        config, options: decoding settings (:func:`generation_config`), checked first.
    """
    config = generation_config(config, **options)
    processor = processor_of(model, processor)
    batch = _render(model, conversations, processor)
    tokenizer = processor.tokenizer
    out = generate(model, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), config,
                   eos_ids=_eos_ids(tokenizer), tokenizer=tokenizer)
    return [text.strip() for text in out.texts]


def chat(model, messages: Messages, *, processor=None, config: GenerationConfig | None = None, **options: Any) -> str:
    """One conversation in, the assistant's reply out (see :func:`chat_batch`).

    Example::

        chat(model, [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                  {"type": "text", "text": "What is this?"}]}])
    """
    return chat_batch(model, [messages], processor=processor, config=config, **options)[0]


def chat_stream(model, messages: Messages, *, processor=None, config: GenerationConfig | None = None,
                **options: Any) -> Iterator[str]:
    """The reply of :func:`chat` as text pieces while it is generated; ``"".join`` equals it.

    Options, the conversation and its media are checked (and rendered) before this returns;
    the model runs as the iterator is consumed, and breaking out of it leaves the model
    usable.
    """
    config = generation_config(config, **options)
    processor = processor_of(model, processor)
    batch = _render(model, [messages], processor)
    tokens = stream_tokens(model, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), config,
                           len(processor.tokenizer))
    return _stream_text(tokens, processor.tokenizer, config)


def _stream_text(tokens: Iterator[Tensor], tokenizer, config: GenerationConfig) -> Iterator[str]:
    reply = ReplyText(tokenizer, config.stop_strings)
    eos = set(_eos_ids(tokenizer))
    shown = ""
    with closing(tokens):
        for step in tokens:
            token = int(step[0])
            if token in eos or reply.add(token):
                break
            # Leading and trailing whitespace is stripped from the final reply; holding back the
            # trailing part keeps every piece shown a prefix of it.
            visible = reply.stable_text().strip()
            if len(visible) > len(shown) and visible.startswith(shown):
                yield visible[len(shown):]
                shown = visible
    final = reply.text().strip()
    if len(final) > len(shown):
        yield final[len(shown):]


class ChatSession:
    """A multi-turn conversation with a model; every turn sees all earlier turns and their images.

    Example::

        session = ChatSession(model, system="Answer in one word.")
        session.ask("What colour is the circle?", images=["shapes.png"])
        session.ask("And its shape?")   # the image of the first turn is still in the prompt
    """

    def __init__(self, model, *, system: str | None = None, processor=None,
                 config: GenerationConfig | None = None, **options: Any):
        self.model = model
        self.processor = processor_of(model, processor)
        self.config = generation_config(config, **options)
        self.messages: list[dict[str, Any]] = []
        if system is not None:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": system}]})

    @staticmethod
    def user_message(text: str, images: Sequence[Any] = (), video: Any = None) -> dict[str, Any]:
        """A user turn: the images, then the video, then the text (LLaVA puts media first)."""
        content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
        if video is not None:
            content.append({"type": "video", "video": video})
        content.append({"type": "text", "text": text})
        return {"role": "user", "content": content}

    def ask(self, text: str, images: Sequence[Any] = (), video: Any = None) -> str:
        """Add a user turn, answer it, and keep the answer in the conversation."""
        return "".join(self.ask_stream(text, images, video))

    def ask_stream(self, text: str, images: Sequence[Any] = (), video: Any = None) -> Iterator[str]:
        """:meth:`ask` as pieces; the turn is kept only if the reply is read to its end."""
        messages = [*self.messages, self.user_message(text, images, video)]
        pieces = chat_stream(self.model, messages, processor=self.processor, config=self.config)
        return self._record(messages, pieces)

    def _record(self, messages: list[dict[str, Any]], pieces: Iterator[str]) -> Iterator[str]:
        reply = []
        with closing(pieces):
            for piece in pieces:
                reply.append(piece)
                yield piece
        self.messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": "".join(reply)}]}]


# ---- likelihood scoring ------------------------------------------------------------------------------
def continuation_logprobs(model, messages: Messages, continuations: Sequence[str], *, processor=None) -> list[Tensor]:
    """Per-token log-probabilities of each continuation as the assistant's reply to ``messages``.

    The ``loglikelihood`` request of the lm-evaluation-harness (GPT-3, Brown et al. 2020, sec.
    2.4): ``log p(c_t | prompt, c_<t)`` for every token of every continuation, in one batch whose
    rows share the prompt (with its images) and end with one continuation each.

    Returns:
        One float32 ``[L_i]`` tensor per continuation (on the CPU).
    """
    processor = processor_of(model, processor)
    if isinstance(continuations, str) or not continuations:
        raise ValueError("continuations must be a non-empty sequence of strings")
    prompt = processor.render(messages, add_generation_prompt=True)
    tokenizer = processor.tokenizer
    encoded = [tokenizer.encode(c) for c in continuations]
    empty = [c for c, ids in zip(continuations, encoded) if not ids]
    if empty:
        raise ValueError(f"continuations {empty} encode to no tokens; an empty answer cannot be scored")
    P, width = len(prompt.input_ids), len(prompt.input_ids) + max(map(len, encoded))
    if width > model.config.decoder.max_seq_len:
        raise ValueError(f"prompt ({P} tokens) plus the longest continuation exceeds the model's context of "
                         f"{model.config.decoder.max_seq_len} tokens")
    B = len(encoded)
    ids = torch.full((B, width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.bool)
    for row, cont in enumerate(encoded):
        ids[row, : P + len(cont)] = torch.tensor(prompt.input_ids + cont)
        mask[row, : P + len(cont)] = True
    pixels = prompt.pixel_values.repeat(B, 1, 1, 1) if prompt.pixel_values.shape[0] else None
    device = model.device
    with torch.no_grad():
        hidden = model(ids.to(device), pixel_values=None if pixels is None else pixels.to(device),
                       attention_mask=mask.to(device), return_logits=False).hidden
        out = []
        for row, cont in enumerate(encoded):
            # The state at position t predicts token t + 1: the continuation's tokens are
            # predicted from positions P - 1 .. P + L - 2. Only those are projected to the vocabulary.
            logits = model.decoder.logits(hidden[row, P - 1 : P - 1 + len(cont)]).float()
            targets = torch.tensor(cont, device=device)
            out.append(logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1).cpu())
    return out


def logprob_fn(model, images: Sequence[Any] = (), *, system: str | None = None,
               processor=None) -> Callable[[str, str], Tensor]:
    """A ``logprob_fn(prompt, continuation) -> [L]`` for :mod:`minivlm.eval.choice`.

    ``prompt`` becomes a user turn showing ``images`` (after an optional system turn), and the
    continuation is scored as the assistant's reply (:func:`continuation_logprobs`)::

        pick_option(logprob_fn(model, ["shapes.png"]), "What shape is it?", ["circle", "triangle"])
    """
    processor = processor_of(model, processor)
    head = [] if system is None else [{"role": "system", "content": system}]

    def fn(prompt: str, continuation: str) -> Tensor:
        messages = [*head, ChatSession.user_message(prompt, images)]
        return continuation_logprobs(model, messages, [continuation], processor=processor)[0]

    return fn

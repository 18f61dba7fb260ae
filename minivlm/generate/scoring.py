"""Likelihood scoring: the log-probabilities of given answers instead of generated ones, for
multiple-choice evaluation (:mod:`minivlm.eval.choice`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from minivlm.generate.chat import ChatSession, Messages, processor_of


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

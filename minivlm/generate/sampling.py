"""From next-token logits to tokens, in the usual order (Hugging Face ``generate``): repetition
penalty (CTRL, Keskar et al. 2019), temperature, top-k (Fan et al. 2018), top-p (nucleus, Holtzman
et al. 2020), then argmax (greedy) or a sample."""

from __future__ import annotations

import torch
from torch import Tensor

from minivlm.generate.config import GenerationConfig


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

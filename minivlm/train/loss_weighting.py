"""How much each training sample's tokens weigh in the loss.

The loss of a step is a weighted mean over its supervised tokens, ``sum(w_t * ce_t) / sum(w_t)``,
with every token of a sample ``s`` weighted ``w(n_s)`` where ``n_s`` is the sample's number of
supervised tokens (InternVL 2.5, Chen et al. 2024, section 4.3 "loss reweighting"):

* ``token`` (``w = 1``): every token counts once, the default of most trainers (LLaVA, nanoVLM).
  A sample's share of the gradient grows with its answer length, so a mixture weight is a share
  of *samples*, not of the loss: in ``tiny``'s mixture, grouped easy-VQA items (~20 answer tokens,
  every question about an image) drew 55% of the samples but 84% of the loss, and video (2
  answer tokens) 20% of the samples but 3% of the loss.
* ``sample`` (``w = 1 / n_s``): every sample weighs the same whatever its length; the mixture
  weights are then the tasks' shares of the loss. Long answers learn less per token.
* ``square`` (``w = 1 / sqrt(n_s)``): InternVL 2.5's compromise; a sample weighs ``sqrt(n_s)``.

A *sample* is one item drawn from the dataset: a grouped item (several questions about one
image, trained as one shared-prefix sequence) is one sample, its questions sharing its weight.
"""

from __future__ import annotations

import math

LOSS_WEIGHTINGS = ("token", "sample", "square")


def sample_loss_weight(n_supervised: int, weighting: str) -> float:
    """The weight of each supervised token of a sample with ``n_supervised`` of them.

    A sample without supervised tokens gets 0 (it contributes nothing either way).

    Raises:
        ValueError: an unknown ``weighting`` or a negative count.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}; got {weighting!r}")
    if n_supervised < 0:
        raise ValueError(f"a sample cannot have {n_supervised} supervised tokens")
    if n_supervised == 0:
        return 0.0
    if weighting == "token":
        return 1.0
    return 1.0 / n_supervised if weighting == "sample" else 1.0 / math.sqrt(n_supervised)

"""Training stages as per-part learning-rate scales; a scale of 0 freezes the part.

LLaVA's recipe (Liu et al. 2023) is two stages: ``align`` trains only the projector on
image-caption pairs, ``finetune`` then trains projector + decoder on instructions. ``full`` trains
everything (what a from-scratch model needs). ``custom`` starts from ``full`` and applies
``train.lr_scale``, e.g. ``{"encoder": 0.1}`` or ``{"encoder": 0}`` to freeze it.
"""

from __future__ import annotations

from minivlm.config import TrainConfig
from minivlm.model import PARTS, VisionLanguageModel

# Fusion parameters (cross-attention blocks) are new in every stage that trains the bridge.
STAGES: dict[str, dict[str, float]] = {
    "align": {"encoder": 0.0, "projector": 1.0, "fusion": 1.0, "decoder": 0.0},
    "finetune": {"encoder": 0.0, "projector": 1.0, "fusion": 1.0, "decoder": 1.0},
    "full": {"encoder": 1.0, "projector": 1.0, "fusion": 1.0, "decoder": 1.0},
    "custom": {"encoder": 1.0, "projector": 1.0, "fusion": 1.0, "decoder": 1.0},
}


def part_lr_scales(cfg: TrainConfig) -> dict[str, float]:
    """The stage's scales with ``cfg.lr_scale`` multiplied in."""
    if cfg.stage not in STAGES:
        raise ValueError(f"train.stage: unknown stage {cfg.stage!r}; expected one of {sorted(STAGES)}")
    unknown = sorted(set(cfg.lr_scale) - set(PARTS))
    if unknown:
        raise ValueError(f"train.lr_scale: unknown part(s) {unknown}; expected some of {list(PARTS)}")
    scales = dict(STAGES[cfg.stage])
    for part, scale in cfg.lr_scale.items():
        if scale < 0:
            raise ValueError(f"train.lr_scale.{part}: must be >= 0, got {scale}")
        scales[part] *= scale
    return scales


def apply_stage(model: VisionLanguageModel, scales: dict[str, float]) -> None:
    """Freeze the parts whose scale is 0 and unfreeze the others."""
    for part, scale in scales.items():
        model.part(part).requires_grad_(scale > 0)

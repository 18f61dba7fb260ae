"""The contrastive retrieval head: its settings, the module, the CLIP and SigLIP losses, and its files.

A :class:`RetrievalHead` is an optional, declared submodule of the model
(``VisionLanguageModel.retrieval_head``, added with ``add_retrieval_head``): it projects the
encoder's pooled image embedding and the decoder's mean text state into one space, and carries the
learned temperature. Training, embeddings and evaluation are in :mod:`minivlm.retrieval`.

Objectives, both with learnable temperature:

* ``"clip"``: the symmetric InfoNCE loss of CLIP (van den Oord et al. 2018; Radford et al. 2021):
  cross-entropy over each row and each column of the ``B x B`` similarity matrix scaled by
  ``exp(t)``, ``t`` initialised to ``log(1 / 0.07)`` and capped at ``log(100)``.
* ``"siglip"``: the sigmoid loss of SigLIP (Zhai et al. 2023): every pair is a binary decision,
  ``-sum_ij log sigmoid(z_ij (exp(t) * sim_ij + b)) / B`` with ``z = 1`` on matching pairs and
  ``-1`` elsewhere; ``t = log 10`` and ``b = -10`` at initialisation (their eq. 1 and sec. 3).

Files: the model saves the head beside its weights as ``retrieval_head.json`` (the config) and
``retrieval_head.safetensors`` (:func:`save_head_files`, :func:`load_head_files`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_CONFIG_NAME = "retrieval_head.json"
HEAD_WEIGHTS_NAME = "retrieval_head.safetensors"
LOSSES = ("clip", "siglip")
#: CLIP caps its learned logit scale at 100 "to prevent training instability" (Radford et al. 2021, sec. 2.5).
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class RetrievalConfig:
    """Shape and objective of a :class:`RetrievalHead`.

    Attributes:
        dim: width of the shared embedding space.
        loss: ``"clip"`` (softmax InfoNCE) or ``"siglip"`` (pairwise sigmoid).
        init_temperature: ``exp(t)`` at initialisation; None: the paper's value (1 / 0.07 for
            CLIP, 10 for SigLIP).
        init_bias: SigLIP's bias ``b`` at initialisation (ignored by CLIP).
    """

    dim: int = 128
    loss: str = "clip"
    init_temperature: float | None = None
    init_bias: float = -10.0

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"RetrievalConfig.dim must be a positive int, got {self.dim!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"RetrievalConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.init_temperature is not None and not (math.isfinite(self.init_temperature) and self.init_temperature > 0):
            raise ValueError(f"RetrievalConfig.init_temperature must be a positive number or None, "
                             f"got {self.init_temperature!r}")

    @property
    def resolved_init_temperature(self) -> float:
        if self.init_temperature is not None:
            return self.init_temperature
        return 1 / 0.07 if self.loss == "clip" else 10.0


class RetrievalHead(nn.Module):
    """Projections of both towers into one space, plus the learned temperature (and SigLIP bias).

    ``image_features [N, D_img] -> [N, E]``, ``text_features [M, D_txt] -> [M, E]``, both
    L2-normalised; :meth:`loss` takes a batch of matching pairs.
    """

    def __init__(self, image_dim: int, text_dim: int, config: RetrievalConfig | None = None):
        super().__init__()
        self.config = config or RetrievalConfig()
        dim = self.config.dim
        self.image_proj = nn.Linear(image_dim, dim, bias=False)
        self.text_proj = nn.Linear(text_dim, dim, bias=False)
        # 1/sqrt(fan_in) keeps the projected features at unit scale (CLIP: width ** -0.5).
        nn.init.normal_(self.image_proj.weight, std=image_dim**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text_dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(self.config.resolved_init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(self.config.init_bias)) if self.config.loss == "siglip" else None

    def embed_image_features(self, features: Tensor) -> Tensor:
        return F.normalize(self.image_proj(features), dim=-1)

    def embed_text_features(self, features: Tensor) -> Tensor:
        return F.normalize(self.text_proj(features), dim=-1)

    def logits(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """``[N, E], [M, E] -> [N, M]`` scaled similarities (plus the bias for SigLIP)."""
        logits = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * image_embeds.float() @ text_embeds.float().T
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def loss(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """Contrastive loss of ``B`` matching pairs ``[B, E], [B, E]`` (row i matches row i)."""
        if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
            raise ValueError(f"expected matching [B, E] image and text embeddings, got {list(image_embeds.shape)} "
                             f"and {list(text_embeds.shape)}")
        logits = self.logits(image_embeds, text_embeds)
        if self.config.loss == "clip":
            return clip_loss(logits)
        return siglip_loss(logits)


def clip_loss(logits: Tensor) -> Tensor:
    """Symmetric InfoNCE over ``[B, B]`` logits whose diagonal holds the matching pairs (CLIP, fig. 3)."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def siglip_loss(logits: Tensor) -> Tensor:
    """Pairwise sigmoid loss over ``[B, B]`` logits, summed and divided by ``B`` (SigLIP, alg. 1)."""
    labels = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def save_head_files(head: RetrievalHead, directory: str | Path, state: dict[str, Tensor] | None = None) -> None:
    """Write ``retrieval_head.json`` and ``retrieval_head.safetensors`` into ``directory``.

    ``state`` overrides the head's own weights (e.g. the head's part of a full state gathered
    from FSDP shards).
    """
    from safetensors.torch import save_file

    from minivlm.io_atomic import atomic_path, atomic_write_json

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    source = state if state is not None else head.state_dict()
    with atomic_path(out / HEAD_WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in source.items()}, str(tmp))
    atomic_write_json(out / HEAD_CONFIG_NAME, dataclasses.asdict(head.config))


def load_head_files(directory: str | Path, image_dim: int, text_dim: int,
                    device: str | torch.device = "cpu") -> RetrievalHead | None:
    """The head saved in ``directory`` (None when it holds none).

    Raises:
        ValueError: the weights do not match the saved config.
    """
    from minivlm.safetensors_io import load_safetensors

    d = Path(directory)
    if not (d / HEAD_CONFIG_NAME).is_file():
        return None
    head = RetrievalHead(image_dim, text_dim, RetrievalConfig(**json.loads((d / HEAD_CONFIG_NAME).read_text())))
    state = load_safetensors(d / HEAD_WEIGHTS_NAME, device=str(device))
    missing, unexpected = head.to(device).load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{d / HEAD_WEIGHTS_NAME} does not match its {HEAD_CONFIG_NAME}: "
                         f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return head

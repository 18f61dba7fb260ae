"""Cross-modal retrieval metrics: recall@k, mean and median rank.

The protocol of image-text retrieval on Flickr30k / MS-COCO (Karpathy & Fei-Fei 2015;
Faghri et al., VSE++, 2018; CLIP, Radford et al. 2021): score every query against every
item, rank the items, and call a query a hit at k when a correct item is among its top k.
When one image has several captions, image->text counts a hit if *any* of its captions is
in the top k, and each caption has its one image as the target of text->image.

Ties are broken *against* the query: an incorrect item that scores exactly as high as the
best correct item is ranked before it. A model whose embeddings collapse to one point gives
every item the same score and must not look perfect (a ``topk``-based implementation would
report recall@1 = 1 for it on diagonal ground truth).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

Targets = Tensor | Sequence[Sequence[int]] | None


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if not len(ks):
        raise ValueError("ks must name at least one cutoff k, got an empty sequence")
    checked = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"every k in ks must be an integer >= 1, got {k!r}")
        checked.append(int(k))
    return tuple(checked)


def target_mask(
    targets: Targets, n_queries: int, n_items: int, device: torch.device | None = None
) -> Tensor:
    """Turn any accepted ground-truth format into a ``[n_queries, n_items]`` bool mask.

    Args:
        targets: ``None`` for the diagonal (query ``i`` matches item ``i``, needs a square
            problem); a ``[n_queries]`` integer tensor with one correct item per query; a
            ``[n_queries, n_items]`` bool tensor; or one list of correct item indices per query.
    """
    if targets is None:
        if n_queries != n_items:
            raise ValueError(
                f"targets=None means diagonal ground truth, which needs as many queries as items; "
                f"got {n_queries} queries and {n_items} items"
            )
        return torch.eye(n_queries, dtype=torch.bool, device=device)
    if isinstance(targets, Tensor):
        if targets.dtype == torch.bool:
            if targets.shape != (n_queries, n_items):
                raise ValueError(
                    f"a bool target mask must have shape [n_queries, n_items] = "
                    f"[{n_queries}, {n_items}], got {list(targets.shape)}"
                )
            mask = targets.to(device)
        else:
            if targets.is_floating_point() or targets.shape != (n_queries,):
                raise ValueError(
                    f"an index target tensor must be integer with shape [n_queries] = [{n_queries}], "
                    f"got dtype {targets.dtype} and shape {list(targets.shape)}"
                )
            if n_queries and (targets.min() < 0 or targets.max() >= n_items):
                raise ValueError(f"target indices must lie in [0, {n_items}), got {targets.tolist()}")
            mask = F.one_hot(targets.long(), n_items).bool().to(device)
    else:
        if len(targets) != n_queries:
            raise ValueError(
                f"got {len(targets)} target lists for {n_queries} queries; expected one per query"
            )
        mask = torch.zeros(n_queries, n_items, dtype=torch.bool, device=device)
        for query, indices in enumerate(targets):
            indices = list(indices)
            if any(not 0 <= i < n_items for i in indices):
                raise ValueError(f"targets[{query}] = {indices} holds an index outside [0, {n_items})")
            mask[query, indices] = True
    empty_queries = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty_queries:
        raise ValueError(f"queries {empty_queries[:10]} have no correct item; every query needs at least one")
    return mask


def target_ranks(similarity: Tensor, targets: Targets = None) -> Tensor:
    """1-based rank of the best-scoring correct item of each query.

    ``rank = 1 + #{incorrect items j : similarity[q, j] >= best correct score}``, so ties
    count against the query (see the module docstring) and the other correct items never
    push the best one down.

    Args:
        similarity: ``[n_queries, n_items]`` scores, higher is better.
        targets: ground truth in any format of :func:`target_mask`.

    Returns:
        ``[n_queries]`` int64 ranks in ``[1, n_items]``.
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be [n_queries, n_items], got shape {list(similarity.shape)}")
    n_queries, n_items = similarity.shape
    if n_queries == 0 or n_items == 0:
        raise ValueError(
            f"similarity must have at least one query and one item, got shape {list(similarity.shape)}"
        )
    if torch.isnan(similarity).any():
        raise ValueError("similarity contains NaN; ranks would be meaningless")
    mask = target_mask(targets, n_queries, n_items, similarity.device)
    scores = similarity.float()
    best_correct = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
    outranking = (scores >= best_correct) & ~mask
    return 1 + outranking.sum(dim=1)


def recall_at_k(
    similarity: Tensor, targets: Targets = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Fraction of queries with a correct item among their top ``k`` items, for each k.

    A ``k`` above ``n_items`` is clamped to it (every query is then a hit). Ties with
    incorrect items count as misses, see :func:`target_ranks`.

    Args:
        similarity: ``[n_queries, n_items]`` scores, higher is better.
        targets: ``None`` for the diagonal, ``[n_queries]`` item indices, a
            ``[n_queries, n_items]`` bool mask, or one list of correct indices per query (a
            query is a hit if *any* of them is in the top k).
        ks: cutoffs, each >= 1.

    Returns:
        ``{"r@1": ..., "r@5": ..., "r@10": ...}`` with values in [0, 1].
    """
    ks = _check_ks(ks)
    ranks = target_ranks(similarity, targets)
    return {f"r@{k}": (ranks <= k).float().mean().item() for k in ks}


def retrieval_metrics(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    text_to_image: Tensor | Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image->text and text->image recall@k, mean and median rank from embeddings.

    Embeddings are L2-normalised here, so similarity is cosine similarity as in CLIP.

    Args:
        image_embeddings: ``[n_images, D]``.
        text_embeddings: ``[n_texts, D]``.
        text_to_image: ``[n_texts]`` index of the image each text describes; ``None`` means
            text ``i`` describes image ``i`` (needs ``n_texts == n_images``). Several texts may
            share an image (5 captions per COCO image); every image needs at least one text.
        ks: recall cutoffs, each >= 1.

    Returns:
        ``{"i2t_r@1", ..., "i2t_mean_rank", "i2t_median_rank", "t2i_r@1", ...,
        "t2i_mean_rank", "t2i_median_rank"}``; recalls in [0, 1], ranks 1-based.
    """
    ks = _check_ks(ks)
    if image_embeddings.ndim != 2 or text_embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must be [n, D], got image {list(image_embeddings.shape)} "
            f"and text {list(text_embeddings.shape)}"
        )
    if image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(
            f"image and text embeddings must share their width D, got {image_embeddings.shape[1]} "
            f"and {text_embeddings.shape[1]}"
        )
    n_images, n_texts = image_embeddings.shape[0], text_embeddings.shape[0]
    if text_to_image is None:
        if n_images != n_texts:
            raise ValueError(
                f"text_to_image=None pairs text i with image i, which needs as many texts as images; "
                f"got {n_texts} texts and {n_images} images"
            )
        text_to_image = torch.arange(n_texts)
    text_to_image = torch.as_tensor(text_to_image, device=image_embeddings.device)
    if text_to_image.shape != (n_texts,):
        raise ValueError(
            f"text_to_image must have shape [n_texts] = [{n_texts}], got {list(text_to_image.shape)}"
        )

    image_embeddings = F.normalize(image_embeddings.float(), dim=-1)
    text_embeddings = F.normalize(text_embeddings.float(), dim=-1)
    similarity = image_embeddings @ text_embeddings.T  # [n_images, n_texts]
    text_to_image_mask = target_mask(text_to_image, n_texts, n_images, similarity.device)

    metrics: dict[str, float] = {}
    for direction, scores, mask in (
        ("i2t", similarity, text_to_image_mask.T),
        ("t2i", similarity.T, text_to_image_mask),
    ):
        ranks = target_ranks(scores, mask)
        for k in ks:
            metrics[f"{direction}_r@{k}"] = (ranks <= k).float().mean().item()
        metrics[f"{direction}_mean_rank"] = ranks.float().mean().item()
        # The true median (mean of the two middle ranks for an even count), not torch.median's
        # lower middle value.
        metrics[f"{direction}_median_rank"] = ranks.float().quantile(0.5).item()
    logger.debug("retrieval over %d images and %d texts: %s", n_images, n_texts, metrics)
    return metrics

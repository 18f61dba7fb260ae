"""The training forward + loss compiles as one graph: no host syncs, no data-dependent shapes.

``torch._dynamo.explain`` traces the step and lists every graph break; for each fusion, padded
and packed rows (and shared-prefix branches), there must be none. The value checks that need a
host sync (ids in the vocabulary, placeholders matching images) run eagerly by default and are
skipped while compiling (:meth:`VisionLanguageModel.check_inputs`).
"""

from __future__ import annotations

import pytest
import torch

from minivlm import VisionLanguageModel, preset
from minivlm.registry import image_seq_len
from tinykit import TINY_PARTS

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(cfg, layout: str) -> dict[str, torch.Tensor]:
    """Two rows, one image each: padded (row 1 ends in padding), packed (row 0 holds two
    documents, the second text-only) or branches (a prefix with two continuations per row)."""
    g = torch.Generator().manual_seed(0)
    n = image_seq_len(cfg)
    T = n + 24
    ids = torch.randint(cfg.image_token_id + 1, cfg.decoder.vocab_size, (2, T), generator=g)
    ids[:, 1:1 + n] = cfg.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n] = -100
    e = cfg.encoder
    batch = {"input_ids": ids, "labels": labels,
             "pixel_values": torch.randn(2, e.pixel_channels, e.image_size, e.image_size, generator=g)}
    if layout == "padded":
        mask = torch.ones(2, T, dtype=torch.bool)
        mask[1, -5:] = False
        labels[1, -5:] = -100
        batch["attention_mask"] = mask
    elif layout == "packed":
        docs = torch.zeros(2, T, dtype=torch.long)
        docs[0, n + 12:] = 1
        positions = torch.arange(T).expand(2, T).clone()
        positions[0, n + 12:] -= n + 12
        batch.update(document_ids=docs, position_ids=positions, attention_mask=torch.ones(2, T, dtype=torch.bool))
    elif layout == "branches":
        branches = torch.zeros(2, T, dtype=torch.long)
        branches[:, n + 8:n + 16], branches[:, n + 16:] = 1, 2
        positions = torch.arange(T).expand(2, T).clone()
        positions[:, n + 16:] -= 8  # the second branch continues the prefix, as the first does
        batch.update(branch_ids=branches, position_ids=positions)
    return batch


CASES = [("splice", "padded"), ("prefix", "padded"), ("cross_attention", "padded"), ("splice", "packed"),
         ("prefix", "packed"), ("cross_attention", "packed"), ("splice", "branches"), ("prefix", "branches"),
         ("cross_attention", "branches")]


@pytest.mark.parametrize("fusion, layout", CASES)
def test_training_forward_and_loss_compile_without_graph_breaks(fusion, layout):
    cfg = preset("tiny").override(*TINY_PARTS, f"fusion={fusion}")
    model = VisionLanguageModel(cfg).train()
    batch = _batch(cfg, layout)

    def step(batch):
        return model(**batch, return_logits=False).loss

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(batch)
    assert [b.reason for b in explanation.break_reasons] == []
    assert explanation.graph_count == 1
    eager = step(batch)
    assert torch.isfinite(eager) and eager > 0

"""Gated cross-attention on packed rows: each document sees its own images only, so a packed row
computes what its documents compute alone (the main job packs every batch)."""

from __future__ import annotations

import pytest
import torch

from minivlm import VisionLanguageModel, preset
from minivlm.fusion.cross_attention import images_before_document
from tests.test_model import make_batch


def test_images_before_document_counts_the_earlier_documents_markers():
    is_marker = torch.tensor([[1, 0, 1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2]])
    assert images_before_document(is_marker, documents).tolist() == [[0, 0, 0, 2, 2, 2, 3, 3]]


@pytest.mark.parametrize("images", [(1, 2), (0, 1), (2, 0)])
def test_a_packed_row_computes_each_document_as_alone(images):
    torch.manual_seed(0)
    cfg = preset("tiny").override("fusion=cross_attention")
    model = VisionLanguageModel(cfg).eval()
    for block in model.fusion.blocks:  # open the gates: at 0 the images would change nothing
        block.attn_gate.data.fill_(1.0)
        block.mlp_gate.data.fill_(1.0)
    docs = [make_batch(cfg, [k], seed=i) for i, k in enumerate(images)]
    with torch.no_grad():
        alone = [model(ids, pixel_values=px if len(px) else None).logits[0] for ids, px in docs]
        ids = torch.cat([d[0] for d in docs], dim=1)
        pixels = torch.cat([d[1] for d in docs])
        lengths = [d[0].shape[1] for d in docs]
        document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        packed = model(ids, pixel_values=pixels if len(pixels) else None, document_ids=document_ids,
                       position_ids=positions).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), atol=2e-5, rtol=2e-5)

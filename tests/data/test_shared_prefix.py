"""Shared-prefix merging: several questions about one image trained as one sequence.

The contract of :func:`merge_shared_prefix`: a merged group gives the *same* loss and gradients as
its samples trained one per row, for every fusion, padded or packed; it only saves compute.
"""

from __future__ import annotations

import copy

import pytest
import torch

from minivlm.data.collate import IGNORE_INDEX, merge_shared_prefix, pad_collate
from minivlm.kernels.mask import AttentionMask
from minivlm.registry import image_seq_len
from minivlm.train.data import RenderedGroup, TrainCollator
from tests.train import trainkit

pytestmark = pytest.mark.usefixtures("one_thread")


def questions_about(sample: dict, texts: list[tuple[str, str]]) -> list[dict]:
    """Copies of ``sample`` (same image) asking each ``(question, answer)`` instead."""
    out = []
    for question, answer in texts:
        s = copy.deepcopy(sample)
        user, assistant = s["messages"]
        user["content"] = [item for item in user["content"] if item["type"] == "image"] + [
            {"type": "text", "text": question}]
        assistant["content"] = [{"type": "text", "text": answer}]
        out.append(s)
    return out


QA = [("What color is the circle?", "red"), ("How many circles are there?", "2"),
      ("Describe the image.", "two red circles and a blue rectangle")]


def rendered(cfg, samples):
    proc = trainkit.processor(cfg)
    return [proc.render(s["messages"], for_training=True) for s in samples]


def test_merge_layout_prefix_once_then_branches():
    cfg = trainkit.config()
    group = rendered(cfg, questions_about(trainkit.shapes_samples()[0], QA))
    merged = merge_shared_prefix(group, cfg.image_token_id)
    prefix = merged["branch_ids"].count(0)
    assert prefix > image_seq_len(cfg)  # header + every image token is shared
    assert merged["input_ids"].count(cfg.image_token_id) == image_seq_len(cfg)  # the image once
    assert len(merged["input_ids"]) == prefix + sum(len(g) - prefix for g in group)
    assert torch.equal(merged["pixel_values"], group[0].pixel_values)
    for k, g in enumerate(group, start=1):
        cols = [i for i, b in enumerate(merged["branch_ids"]) if b == k]
        assert [merged["input_ids"][i] for i in cols] == g.input_ids[prefix:]
        assert [merged["labels"][i] for i in cols] == g.labels[prefix:]
        assert [merged["position_ids"][i] for i in cols] == list(range(prefix, len(g)))
        assert merged["labels"][cols[0]] == IGNORE_INDEX
    assert sum(label != IGNORE_INDEX for label in merged["labels"]) == sum(g.n_supervised for g in group)


def _loss_and_grads(model, batch):
    model.zero_grad()
    inputs = {k: v for k, v in batch.items()
              if k in ("input_ids", "pixel_values", "labels", "attention_mask", "position_ids", "document_ids",
                       "branch_ids") and v is not None}
    out = model(**inputs, return_logits=False)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_sum.detach(), int(out.n_supervised), grads


@pytest.mark.parametrize("fusion,pack", [("splice", None), ("splice", 256), ("prefix", None), ("prefix", 256),
                                         ("cross_attention", None)])
def test_merged_group_equals_its_samples_one_per_row(fusion, pack):
    cfg = trainkit.config(f"fusion={fusion}", "decoder.n_layers=2", "decoder.max_seq_len=512")
    if fusion == "cross_attention":
        cfg = cfg.override("fusion.every=1")
    samples = trainkit.shapes_samples()
    group = rendered(cfg, questions_about(samples[0], QA))
    others = rendered(cfg, [samples[1], samples[2]])  # ordinary samples in the same batch
    model = trainkit.model(cfg)
    if fusion == "cross_attention":
        with torch.no_grad():  # open the zero-initialised gates so images matter
            for name, p in model.named_parameters():
                if "gate" in name:
                    p.fill_(0.5)
    pad_id = trainkit.processor(cfg).tokenizer.pad_id
    separate = _loss_and_grads(model, pad_collate(group + others, pad_id))
    collate = TrainCollator(pad_id, pack, cfg.image_token_id)
    batch = collate([RenderedGroup(group, []), *others])
    assert "branch_ids" in batch and batch["n_samples"] == 5
    assert batch["pixel_values"].shape[0] == 3  # the group's image is encoded once
    merged = _loss_and_grads(model, batch)
    assert merged[1] == separate[1]
    torch.testing.assert_close(merged[0], separate[0], rtol=1e-5, atol=1e-5)
    assert merged[2].keys() == separate[2].keys()
    for name in separate[2]:
        torch.testing.assert_close(merged[2][name], separate[2][name], rtol=1e-4, atol=2e-5, msg=name)


def test_group_too_long_for_a_pack_row_is_split():
    cfg = trainkit.config()
    group = rendered(cfg, questions_about(trainkit.shapes_samples()[0], QA * 4))
    pad_id = trainkit.processor(cfg).tokenizer.pad_id
    row = max(len(g) for g in group) + 20
    batch = TrainCollator(pad_id, row, cfg.image_token_id)([RenderedGroup(group, ["too long"])])
    assert batch["n_samples"] == len(group) and batch["skipped"] == {"too long": 1}
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(g.n_supervised for g in group)
    assert batch["pixel_values"].shape[0] > 1  # several rows, each with its own copy of the image


def test_branch_mask_hides_siblings():
    #            prefix  | branch 1 | branch 2
    branch = torch.tensor([[0, 0, 1, 1, 2, 2]])
    allowed = AttentionMask(causal=True, branch_ids=branch).dense(6, 6)[0, 0]
    assert allowed[4].tolist() == [True, True, False, False, True, False]  # branch 2 skips branch 1
    assert allowed[3].tolist() == [True, True, True, True, False, False]
    assert AttentionMask(branch_ids=branch).kind == "branches"


def test_flex_mask_mod_matches_dense_for_branches():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from minivlm.kernels.flex_attention import vlm_mask_mod

    branch = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 3, 3, 0]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1]])
    mask = AttentionMask(causal=True, branch_ids=branch, document_ids=docs)
    mod = vlm_mask_mod(mask, 2)
    b, q, k = torch.meshgrid(torch.arange(2), torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(mod(b, torch.zeros_like(b), q, k), mask.dense(8, 8)[:, 0])


def test_triton_refuses_branch_masks():
    from minivlm.kernels.triton_attention import triton_attention

    q = torch.zeros(1, 2, 4, 16)
    with pytest.raises(ValueError, match="branch"):
        triton_attention(q, q, q, AttentionMask(branch_ids=torch.tensor([[0, 1, 1, 2]])))


def test_merge_errors_name_the_problem():
    cfg = trainkit.config()
    samples = trainkit.shapes_samples()
    a, b = rendered(cfg, [samples[0], samples[1]])  # different images
    with pytest.raises(ValueError, match="different images"):
        merge_shared_prefix([a, b], cfg.image_token_id)
    with pytest.raises(ValueError, match="at least one"):
        merge_shared_prefix([], cfg.image_token_id)
    text_first = {"input_ids": [5, 6, cfg.image_token_id], "labels": [IGNORE_INDEX, 7, IGNORE_INDEX]}
    other = {"input_ids": [5, 8, cfg.image_token_id], "labels": [IGNORE_INDEX, 7, IGNORE_INDEX]}
    with pytest.raises(ValueError, match="after the shared prefix"):
        merge_shared_prefix([text_first, other], cfg.image_token_id)


def test_model_refuses_branches_without_positions():
    cfg = trainkit.config()
    model = trainkit.model(cfg)
    ids = torch.full((1, 4), 5)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, branch_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="branch_ids must be"):
        model(ids, branch_ids=torch.zeros(1, 3, dtype=torch.long), position_ids=torch.arange(4)[None])

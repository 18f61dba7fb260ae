"""Training stages are per-part learning-rate scales; a scale of 0 freezes the part."""

from __future__ import annotations

import pytest
import torch
import trainkit as tk

from minivlm.config import TrainConfig
from minivlm.model import PARTS
from minivlm.train.stages import STAGES, apply_stage, part_lr_scales
from minivlm.train.trainer import Trainer


def _part_weights(model, part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tk.weights(model).items() if k.startswith(f"{part}.")}


@pytest.mark.parametrize("fusion", ["splice", "cross_attention"])
def test_align_trains_only_the_projector_and_fusion(tmp_path, fusion):
    cfg = tk.config("train.stage=align", "train.steps=2", f"fusion={fusion}")
    trainer = Trainer(tk.model(cfg), tk.processor(cfg), tk.dataset(), tmp_path, dist=tk.cpu(), progress=False)
    before = {part: _part_weights(trainer.model, part) for part in PARTS}
    trainer.fit()
    for part in ("encoder", "decoder"):
        after = _part_weights(trainer.model, part)
        assert all(torch.equal(after[k], v) for k, v in before[part].items()), f"{part} changed"
    trainable = ("projector", "fusion") if fusion == "cross_attention" else ("projector",)
    for part in trainable:
        after = _part_weights(trainer.model, part)
        assert any(not torch.equal(after[k], v) for k, v in before[part].items()), f"{part} did not train"
    groups = {g["name"].split("/")[0] for g in trainer.optimizer.param_groups}
    assert groups == set(trainable)


def test_per_part_learning_rate_scales_reach_the_optimizer_groups(tmp_path):
    cfg = tk.config("train.stage=custom", 'train.lr_scale={"encoder": 0.1, "projector": 2.0}', "train.lr=1e-3")
    trainer = Trainer(tk.model(cfg), tk.processor(), tk.dataset(), tmp_path, dist=tk.cpu(), progress=False)
    base_lr = {g["name"]: g["base_lr"] for g in trainer.optimizer.param_groups}
    assert base_lr["encoder/decay"] == pytest.approx(1e-4) and base_lr["encoder/no_decay"] == pytest.approx(1e-4)
    assert base_lr["projector/decay"] == pytest.approx(2e-3)
    assert base_lr["decoder/decay"] == pytest.approx(1e-3)


def test_a_zero_scale_freezes_that_part(tmp_path):
    cfg = tk.config("train.stage=finetune", 'train.lr_scale={"projector": 0}')
    trainer = Trainer(tk.model(cfg), tk.processor(), tk.dataset(), tmp_path, dist=tk.cpu(), progress=False)
    frozen = [p.requires_grad for part in ("encoder", "projector") for p in trainer.model.part(part).parameters()]
    assert not any(frozen)
    assert all(p.requires_grad for p in trainer.model.decoder.parameters())


def test_every_stage_scales_every_part():
    for stage, scales in STAGES.items():
        assert set(scales) == set(PARTS), stage
    assert part_lr_scales(TrainConfig(stage="align")) == {"encoder": 0.0, "projector": 1.0, "fusion": 1.0,
                                                          "decoder": 0.0}


@pytest.mark.parametrize(("cfg", "message"), [
    (TrainConfig(stage="pretrain"), "train.stage: unknown stage 'pretrain'"),
    (TrainConfig(lr_scale={"vision": 0.5}), r"train.lr_scale: unknown part\(s\) \['vision'\]"),
    (TrainConfig(lr_scale={"encoder": -1.0}), "train.lr_scale.encoder: must be >= 0"),
])
def test_bad_stage_settings_raise(cfg, message):
    with pytest.raises(ValueError, match=message):
        part_lr_scales(cfg)


def test_apply_stage_unfreezes_what_a_previous_stage_froze():
    model = tk.model(tk.config())
    apply_stage(model, part_lr_scales(TrainConfig(stage="align")))
    assert not any(p.requires_grad for p in model.decoder.parameters())
    apply_stage(model, part_lr_scales(TrainConfig(stage="full")))
    assert all(p.requires_grad for p in model.parameters())

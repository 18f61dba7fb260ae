"""The contrastive objective trained beside generation (``train.retrieval_weight``,
minivlm/train/contrastive.py): the model gets a retrieval head, each step adds the loss of its own
image-caption pairs, a resumed run is bit for bit the uninterrupted one, and bad settings are
refused before anything runs."""

from __future__ import annotations

import pytest
import torch
import trainkit as tk

from minivlm.config import ConfigError
from minivlm.model import VisionLanguageModel
from minivlm.retrieval_head import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME, RetrievalHead
from minivlm.train import checkpoint as ckpt
from minivlm.train.contrastive import ContrastiveObjective, check_contrastive_config
from minivlm.train.trainer import Trainer

CONTRASTIVE = ("train.retrieval_weight=0.5", "train.retrieval_batch_size=8")


def _trainer(run_dir, *overrides, dist=None) -> Trainer:
    cfg = tk.config(*CONTRASTIVE, *overrides)
    return Trainer(tk.model(cfg, seed=0), tk.processor(), tk.dataset(), run_dir, dist=dist or tk.cpu(), progress=False)


def test_training_with_a_retrieval_weight_attaches_a_head_and_logs_its_loss(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=3", "train.save_every=3")
    assert isinstance(trainer.model.retrieval_head, RetrievalHead)
    head_params = {id(p) for p in trainer.model.retrieval_head.parameters()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert head_params <= optimised  # attached before the optimizer was built
    before = {k: v.clone() for k, v in trainer.model.retrieval_head.state_dict().items()}
    result = trainer.fit()
    trainer.close()
    losses = [record["contrastive_loss"] for record in result.history]
    # An untrained CLIP head scores near chance: the loss starts near log(B) = log(8) ~ 2.08.
    assert len(losses) == 3 and all(1.0 < loss < 4.0 for loss in losses)
    after = trainer.model.retrieval_head.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the head trained
    step_dir = tmp_path / "checkpoints" / "step_000003"
    assert (step_dir / HEAD_CONFIG_NAME).is_file() and (step_dir / HEAD_WEIGHTS_NAME).is_file()
    saved = VisionLanguageModel.from_pretrained(step_dir)
    assert torch.equal(saved.retrieval_head.logit_scale, trainer.model.retrieval_head.logit_scale)


def test_without_a_weight_there_is_no_head_and_no_contrastive_record(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=1", "train.retrieval_weight=0")
    result = trainer.fit()
    trainer.close()
    assert trainer.model.retrieval_head is None and "contrastive_loss" not in result.history[0]


def test_a_resumed_run_draws_the_same_pairs_and_restores_the_head(tmp_path):
    straight = _trainer(tmp_path / "straight", "train.steps=4")
    straight.fit()
    straight.close()
    first = _trainer(tmp_path / "resumed", "train.steps=4", "train.save_every=2")
    tk.crash_after_checkpoint(first, step=2)
    with pytest.raises(tk.SimulatedCrash):
        first.fit()
    first.close()
    resumed = _trainer(tmp_path / "resumed", "train.steps=4", "train.save_every=2")
    with torch.no_grad():  # a fresh head: only the checkpoint can bring back the trained one
        for p in resumed.model.retrieval_head.parameters():
            p.zero_()
    resumed.fit(resume=True)
    resumed.close()
    assert tk.weights(resumed.model).keys() == tk.weights(straight.model).keys()
    for key, value in tk.weights(straight.model).items():
        assert torch.equal(value, tk.weights(resumed.model)[key]), key
    assert any(k.startswith("retrieval_head.") for k in tk.weights(straight.model))


def test_a_checkpoint_without_the_head_cannot_resume_a_run_that_trains_one(tmp_path):
    plain = _trainer(tmp_path, "train.steps=2", "train.save_every=2", "train.retrieval_weight=0")
    plain.fit()
    plain.close()
    contrastive = _trainer(tmp_path, "train.steps=2", "train.save_every=2")
    with pytest.raises(ckpt.CheckpointError, match="holds no retrieval head"):
        contrastive.fit(resume=True)
    contrastive.close()


def test_the_pairs_of_a_step_depend_only_on_seed_and_step():
    pairs = [{"image": torch.zeros(3, 8, 8), "caption": f"caption {i}"} for i in range(50)]
    a, b = ContrastiveObjective(pairs, None, 8, seed=0), ContrastiveObjective(pairs, None, 8, seed=0)
    assert a.indices(5) == b.indices(5) and len(set(a.indices(5))) == 8
    assert a.indices(5) != a.indices(6)
    assert a.indices(5) != ContrastiveObjective(pairs, None, 8, seed=1).indices(5)


@pytest.mark.parametrize("override, message", [
    ("train.retrieval_weight=-1", "train.retrieval_weight: expected a finite number >= 0"),
    ("train.retrieval_batch_size=1", "train.retrieval_batch_size: expected an integer >= 2"),
    ("train.retrieval_loss=cosine", "train.retrieval_loss: expected one of clip, siglip, got 'cosine'"),
    ("train.retrieval_data=shapes", "samples need 'image' and 'caption'"),
])
def test_bad_contrastive_settings_are_refused_before_the_run_directory_is_touched(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _trainer(tmp_path / "run", override)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_distributed_runs_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="one process only .*2 ranks.*retrieval_weight=0"):
        check_contrastive_config(tk.config(*CONTRASTIVE).train, world_size=2)


def test_too_few_pairs_for_a_batch_are_refused():
    with pytest.raises(ConfigError, match="3 image-caption pairs, fewer than train.retrieval_batch_size=8"):
        ContrastiveObjective([{"image": None, "caption": "x"}] * 3, None, 8, seed=0)

"""What the trainer reads: a curriculum before the main mixture, and grouped items.

* ``data.curriculum`` for ``data.curriculum_steps`` steps, then ``data.mixture``; every index is a
  pure function of the step, so resuming anywhere reads the same samples.
* A dataset item that is a list of samples (several questions about one image) is trained as one
  shared-prefix sample: same supervised tokens, one image encoding.
"""

from __future__ import annotations

import pytest
import torch
import trainkit as tk

from minivlm.config import ConfigError
from minivlm.train.data import CurriculumSampler, StepBatchSampler
from minivlm.train.trainer import Trainer


class Recording(tk.ListDataset):
    """A ListDataset that remembers which indices were read."""

    def __init__(self, samples):
        super().__init__(samples)
        self.reads: list[int] = []

    def __getitem__(self, index):
        self.reads.append(index)
        return super().__getitem__(index)


def _streams(start: int = 0) -> CurriculumSampler:
    first = StepBatchSampler(10, 3, 2, seed=1)
    then = StepBatchSampler(7, 3, 2, seed=1)
    return CurriculumSampler([first, then], [4], [0, 10], start_step=start, total_steps=9)


def _three_phases(start: int = 0) -> CurriculumSampler:
    streams = [StepBatchSampler(n, 2, 1, seed=3) for n in (5, 6, 9)]
    return CurriculumSampler(streams, [2, 5], [0, 5, 11], start_step=start, total_steps=8)


def test_curriculum_sampler_reads_first_then_offset_second():
    batches = list(_streams())
    assert len(batches) == 9 * 2
    assert all(0 <= i < 10 for b in batches[:8] for i in b)  # steps 0-3: the curriculum
    assert all(10 <= i < 17 for b in batches[8:] for i in b)  # steps 4-8: the main data, offset
    # The main stream starts at its own step 0 at the switch: its first epoch, from the start.
    then = StepBatchSampler(7, 3, 2, seed=1)
    assert batches[8] == [10 + i for i in then.indices(0, 0)]


@pytest.mark.parametrize("start", [2, 4, 7])
def test_curriculum_sampler_resumes_anywhere(start):
    assert list(_streams(start)) == list(_streams())[start * 2:]


def test_three_phases_read_their_datasets_in_turn_each_from_its_start():
    batches = list(_three_phases())
    assert all(0 <= i < 5 for b in batches[:2] for i in b)  # steps 0-1
    assert all(5 <= i < 11 for b in batches[2:5] for i in b)  # steps 2-4
    assert all(11 <= i < 20 for b in batches[5:] for i in b)  # steps 5-7: the main data
    assert batches[2] == [5 + i for i in StepBatchSampler(6, 2, 1, seed=3).indices(0, 0)]
    assert batches[5] == [11 + i for i in StepBatchSampler(9, 2, 1, seed=3).indices(0, 0)]


@pytest.mark.parametrize("start", [1, 2, 4, 5, 7])
def test_three_phases_resume_anywhere(start):
    assert list(_three_phases(start)) == list(_three_phases())[start:]


def test_curriculum_sampler_errors():
    with pytest.raises(ValueError, match="switch_steps must be increasing and >= 1; got \\[0\\]"):
        CurriculumSampler([StepBatchSampler(4, 2, 1), StepBatchSampler(4, 2, 1)], [0], [0, 4])
    with pytest.raises(ValueError, match="increasing"):
        CurriculumSampler([StepBatchSampler(4, 2, 1)] * 3, [3, 3], [0, 4, 8])
    with pytest.raises(ValueError, match="same micro-batch"):
        CurriculumSampler([StepBatchSampler(4, 2, 1), StepBatchSampler(4, 3, 1)], [1], [0, 4])
    with pytest.raises(ValueError, match="one switch step fewer"):
        CurriculumSampler([StepBatchSampler(4, 2, 1), StepBatchSampler(4, 2, 1)], [1, 2], [0, 4])


def test_curriculum_takes_at_most_half_the_run(tmp_path):
    cfg = tk.config("train.steps=6", "data.curriculum=shapes", "data.curriculum_steps=600")
    trainer = Trainer(tk.model(cfg), tk.processor(), tk.dataset(8), tmp_path, dist=tk.cpu(), progress=False,
                      curriculum=tk.dataset(8))
    assert trainer.curriculum_steps == 3


def test_trainer_reads_the_curriculum_first(tmp_path):
    cfg = tk.config("train.steps=5", "train.batch_size=2", "data.curriculum=shapes", "data.curriculum_steps=2")
    samples = list(tk.shapes_samples(24))
    curriculum, main = Recording(samples[:12]), Recording(samples[12:])
    result = Trainer(tk.model(cfg), tk.processor(), main, tmp_path, dist=tk.cpu(), progress=False,
                     curriculum=curriculum).fit()
    assert result.steps == 5
    assert len(curriculum.reads) == 2 * 2 and len(main.reads) == 3 * 2


def test_phases_share_half_the_run_the_last_ones_cut_first(tmp_path):
    cfg = tk.config("train.steps=10", "data.curriculum=shapes;shapes;shapes", "data.curriculum_steps=2;2;4")
    trainer = Trainer(tk.model(cfg), tk.processor(), tk.dataset(8), tmp_path, dist=tk.cpu(), progress=False,
                      curriculum=[tk.dataset(8)] * 3)
    assert trainer.curriculum_switches == [2, 4, 5] and trainer.curriculum_steps == 5
    cfg = tk.config("train.steps=6", "data.curriculum=shapes;shapes", "data.curriculum_steps=3;2")
    trainer = Trainer(tk.model(cfg), tk.processor(), tk.dataset(8), tmp_path, dist=tk.cpu(), progress=False,
                      curriculum=[tk.dataset(8)] * 2)
    assert trainer.curriculum_switches == [3] and len(trainer.curriculum) == 1  # no room for the second


def test_trainer_reads_each_phase_in_turn(tmp_path):
    cfg = tk.config("train.steps=7", "train.batch_size=2", "data.curriculum=shapes;shapes",
                    "data.curriculum_steps=1;2")
    samples = list(tk.shapes_samples(24))
    first, second, main = Recording(samples[:8]), Recording(samples[8:16]), Recording(samples[16:])
    result = Trainer(tk.model(cfg), tk.processor(), main, tmp_path, dist=tk.cpu(), progress=False,
                     curriculum=[first, second]).fit()
    assert result.steps == 7
    assert (len(first.reads), len(second.reads), len(main.reads)) == (1 * 2, 2 * 2, 4 * 2)


@pytest.mark.parametrize(("overrides", "message"), [
    (("data.curriculum_steps=2",), r"0 phase\(s\) \(''\) but data.curriculum_steps gives 1"),
    (("data.curriculum=shapes;charts", "data.curriculum_steps=5"), r"2 phase\(s\).*gives 1 step count"),
    (("data.curriculum=shapes", "data.curriculum_steps=five"), "step counts separated by ';'"),
    (("data.curriculum=shapes;", "data.curriculum_steps=3;4"), "needs a mixture and at least 1 step"),
    (("data.curriculum=shapes;charts", "data.curriculum_steps=3;-1"), "needs a mixture and at least 1 step"),
])
def test_curriculum_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tk.config(*overrides).validate()


def test_curriculum_datasets_must_match_the_phases(tmp_path):
    with pytest.raises(ConfigError, match=r"0 phase\(s\) configured but 1 curriculum dataset"):
        Trainer(tk.model(tk.config()), tk.processor(), tk.dataset(8), tmp_path, dist=tk.cpu(), progress=False,
                curriculum=tk.dataset(8))
    cfg = tk.config("data.curriculum=shapes;shapes", "data.curriculum_steps=1;1")
    with pytest.raises(ConfigError, match=r"2 phase\(s\) configured but 1 curriculum dataset"):
        Trainer(tk.model(cfg), tk.processor(), tk.dataset(8), tmp_path, dist=tk.cpu(), progress=False,
                curriculum=[tk.dataset(8)])
    cfg = tk.config("train.steps=1", "data.curriculum=shapes", "data.curriculum_steps=3")
    with pytest.raises(ConfigError, match="train.steps >= 2"):
        Trainer(tk.model(cfg), tk.processor(), tk.dataset(8), tmp_path, dist=tk.cpu(), progress=False,
                curriculum=tk.dataset(8))


def test_without_curriculum_datasets_the_trainer_reads_only_the_main_data(tmp_path):
    # A notebook training a preset (whose recipe has a curriculum) on data of its choice.
    cfg = tk.config("train.steps=3", "train.batch_size=2", "data.curriculum=shapes", "data.curriculum_steps=1")
    main = Recording(list(tk.shapes_samples(8)))
    trainer = Trainer(tk.model(cfg), tk.processor(), main, tmp_path, dist=tk.cpu(), progress=False)
    assert trainer.curriculum_steps == 0
    assert trainer.fit().steps == 3 and len(main.reads) == 3 * 2


def test_a_config_saved_with_an_integer_step_count_still_loads():
    from minivlm.config import DataConfig

    assert DataConfig(curriculum="shapes", curriculum_steps=700).curriculum_phases == [("shapes", 700)]


def _questions(sample: dict, k: int) -> list[dict]:
    """``k`` questions about the image of ``sample`` (its own question, re-asked with new answers)."""
    import copy

    out = []
    for j in range(k):
        s = copy.deepcopy(sample)
        s["messages"][1]["content"] = [{"type": "text", "text": ["red", "blue", "a circle"][j % 3]}]
        out.append(s)
    return out


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_trainer_trains_grouped_items(tmp_path, packing):
    cfg = tk.config("train.steps=4", "train.batch_size=2", f"data.packing={packing}", "data.max_length=128",
                    "decoder.max_seq_len=256")
    groups = tk.ListDataset([_questions(s, 3) for s in tk.shapes_samples(8)])
    trainer = Trainer(tk.model(cfg), tk.processor(), groups, tmp_path, dist=tk.cpu(), progress=False)
    seen = []
    original = trainer._micro_step

    def spy(batch, weight, sync):
        seen.append((batch["n_samples"], batch["pixel_values"].shape[0], "branch_ids" in batch))
        return original(batch, weight, sync)

    trainer._micro_step = spy
    result = trainer.fit()
    assert result.steps == 4 and torch.isfinite(torch.tensor(result.final_loss))
    assert seen == [(6, 2, True)] * 4  # 2 groups of 3 questions each, one image encoding per group


def test_time_budget_is_calibrated_on_the_main_data(tmp_path, monkeypatch):
    import minivlm.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "BUDGET_CALIBRATION_STEPS", 2)
    cfg = tk.config("train.steps=8", "train.batch_size=2", "data.curriculum=shapes", "data.curriculum_steps=3")
    trainer = Trainer(tk.model(cfg), tk.processor(), tk.dataset(16), tmp_path, dist=tk.cpu(), progress=False,
                      curriculum=tk.dataset(8))
    calls = []
    monkeypatch.setattr(trainer, "_fit_schedule_to_budget",
                        lambda elapsed, minutes, per_step, bar: calls.append((trainer.step, per_step)))
    trainer.fit(max_minutes=60)
    assert len(calls) == 1 and calls[0][0] == 3 + 2 and calls[0][1] > 0  # two steps after the switch

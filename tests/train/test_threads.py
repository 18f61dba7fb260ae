"""The CPU thread count is chosen by timing real steps, interleaved, and re-checked as load changes;
it changes only the speed, never which steps run."""

from __future__ import annotations

import pytest
import torch
import trainkit as tk
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.config import ConfigError, preset
from minivlm.train.threads import ThreadTuner, thread_candidates
from minivlm.train.trainer import Trainer


@pytest.mark.parametrize("cores, expected", [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (6, (1, 2, 4, 6)),
                                             (8, (1, 2, 4, 8))])
def test_candidates_are_powers_of_two_and_the_core_count(cores, expected):
    assert thread_candidates(cores) == expected


def drive(tuner: ThreadTuner, step_seconds, steps: int) -> list[int]:
    """Run ``steps`` fake steps whose duration is ``step_seconds(step, threads)``; the threads used."""
    used = []
    for step in range(steps):
        threads = tuner.threads_for_next_step()
        used.append(threads)
        tuner.record(step_seconds(step, threads))
    return used


def test_probes_interleaved_after_warmup_and_keeps_the_faster():
    applied = []
    tuner = ThreadTuner((1, 2), warmup=2, rounds=3, reprobe_every=10, set_threads=applied.append)
    used = drive(tuner, lambda step, threads: {1: 0.6, 2: 2.8}[threads], 12)  # two threads collapse under load
    assert used == [2, 2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1]
    assert tuner.choice == 1 and tuner.history == [{1: 0.6, 2: 2.8}]
    assert applied == [2, 1, 2, 1, 2, 1, 2, 1]  # set only when it changes


def test_measures_again_and_follows_a_change_of_load():
    load_ends = 20

    def seconds(step, threads):  # busy machine at first (one thread wins), then idle (two threads win)
        return {1: 0.6, 2: 2.8}[threads] if step < load_ends else {1: 0.64, 2: 0.40}[threads]

    tuner = ThreadTuner((1, 2), warmup=0, rounds=2, reprobe_every=30, set_threads=lambda n: None)
    used = drive(tuner, seconds, 68)
    assert used[:4] == [1, 2, 1, 2] and used[34:38] == [1, 2, 1, 2]  # probes: steps 0-3, then 30 steps later
    assert used[4:34] == [1] * 30  # chose one thread after the first probe...
    assert used[38:] == [2] * 30  # ...and two once the second probe saw the idle machine
    assert tuner.choice == 2 and tuner.history == [{1: 0.6, 2: 2.8}, {1: 0.64, 2: 0.40}]


def test_a_difference_within_the_tolerance_keeps_the_current_choice():
    tuner = ThreadTuner((1, 2), warmup=0, rounds=3, tolerance=0.05, set_threads=lambda n: None)
    drive(tuner, lambda step, threads: {1: 0.98, 2: 1.0}[threads], 6)
    assert tuner.choice == 2  # 2% faster is noise, not a reason to switch


def test_one_candidate_never_probes():
    applied = []
    tuner = ThreadTuner((3,), set_threads=applied.append)
    assert drive(tuner, lambda step, threads: 1.0, 50) == [3] * 50 and applied == [3] and tuner.history == []


@settings(max_examples=60, deadline=None)
@given(costs=st.lists(st.floats(0.05, 5.0), min_size=2, max_size=5, unique=True),
       noise=st.lists(st.floats(0.97, 1.03), min_size=40, max_size=40))
def test_the_fastest_candidate_wins_under_small_noise(costs, noise):
    candidates = tuple(range(1, len(costs) + 1))
    cost = dict(zip(candidates, costs))
    fastest = min(candidates, key=cost.get)
    tuner = ThreadTuner(candidates, warmup=1, rounds=3, tolerance=0.0, set_threads=lambda n: None)
    drive(tuner, lambda step, threads: cost[threads] * noise[step % len(noise)], 1 + 3 * len(candidates))
    if min(c for t, c in cost.items() if t != fastest) > cost[fastest] * 1.07:  # beyond what the noise can hide
        assert tuner.choice == fastest


@pytest.mark.parametrize("bad", [{"candidates": ()}, {"candidates": (0, 2)}, {"candidates": (1,), "rounds": 0}])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError, match="ThreadTuner|thread candidates"):
        ThreadTuner(**{"candidates": (1, 2), **bad})


def test_trainer_records_the_threads_of_each_step_and_restores_the_setting(tmp_path):
    before = torch.get_num_threads()
    cfg = tk.config("train.steps=3", "train.cpu_threads=1")
    result = Trainer(tk.model(cfg), tk.processor(), tk.dataset(), tmp_path, dist=tk.cpu(), progress=False).fit()
    assert [record["threads"] for record in result.history] == [1, 1, 1]
    assert torch.get_num_threads() == before


def test_cpu_threads_must_be_a_count(tmp_path):
    cfg = tk.config("train.cpu_threads=-1")
    with pytest.raises(ConfigError, match="train.cpu_threads"):
        Trainer(tk.model(cfg), tk.processor(), tk.dataset(), tmp_path, dist=tk.cpu(), progress=False)


def test_the_default_run_length_does_not_depend_on_the_clock(tmp_path, monkeypatch):
    """The main job's preset has no time budget: a machine 1000x slower runs the same steps."""
    import minivlm.train.trainer as trainer_module

    assert preset("tiny").train.max_minutes is None
    cfg = tk.config("train.steps=5")
    cfg.train.max_minutes = preset("tiny").train.max_minutes
    now = [0.0]

    def slow_clock():
        now[0] += 600.0  # every clock read is ten minutes later
        return now[0]

    monkeypatch.setattr(trainer_module.time, "perf_counter", slow_clock)
    result = Trainer(tk.model(cfg), tk.processor(), tk.dataset(), tmp_path, dist=tk.cpu(), progress=False).fit()
    assert result.status == "finished" and result.steps == 5

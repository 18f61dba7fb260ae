"""The trainer reads a sharded source through its own step sampler (the streaming hook), and a
run resumed from a checkpoint equals, bit for bit, the run that never stopped."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import trainkit as tk

from minivlm.config import ConfigError
from minivlm.data.webdataset_source import WebDatasetSource
from minivlm.train.data import ShardSampler
from minivlm.train.trainer import Trainer

OVERRIDES = ("train.steps=6", "train.save_every=3", "train.keep_checkpoints=4", "train.warmup_steps=2")


def write_shards(folder: Path, n_shards: int = 4, per_shard: int = 8) -> str:
    """The test suite's shapes samples as webdataset shards of chat JSON + PNG."""
    samples = tk.shapes_samples(n_shards * per_shard)
    for s in range(n_shards):
        with tarfile.open(folder / f"part-{s}.tar", "w") as tar:
            for i in range(per_shard):
                sample = samples[s * per_shard + i]
                messages = json.loads(json.dumps(sample["messages"], default=lambda _: None))  # images -> null
                image = io.BytesIO()
                sample["messages"][0]["content"][0]["image"].save(image, "PNG")
                for ext, data in (("png", image.getvalue()), ("json", json.dumps({"messages": messages}).encode())):
                    info = tarfile.TarInfo(f"{s}{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "part-{0..3}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


def _trainer(run_dir, spec, seed=0) -> Trainer:
    cfg = tk.config(*OVERRIDES)
    return Trainer(tk.model(cfg, seed=seed), tk.processor(), WebDatasetSource(spec), run_dir, dist=tk.cpu(),
                   progress=False)


def test_a_streamed_run_resumes_bitwise(tmp_path, shards):
    straight = _trainer(tmp_path / "straight", shards)
    assert isinstance(straight._sampler_and_data()[0], ShardSampler)
    losses = [h["loss"] for h in straight.fit().history]
    assert len(losses) == 6 and all(loss is not None for loss in losses)

    crashing = _trainer(tmp_path / "resumed", shards)
    tk.crash_after_checkpoint(crashing, step=3)
    with pytest.raises(tk.SimulatedCrash):
        crashing.fit()
    torch.manual_seed(1234)
    resumed = _trainer(tmp_path / "resumed", shards, seed=99)
    result = resumed.fit(resume=True)
    assert [h["loss"] for h in result.history] == losses[3:]
    assert all(torch.equal(a, b) for a, b in zip(tk.weights(resumed.model).values(),
                                                 tk.weights(straight.model).values()))


def test_a_streamed_run_cannot_resume_with_another_worker_count(tmp_path, shards):
    crashing = _trainer(tmp_path, shards)
    tk.crash_after_checkpoint(crashing, step=3)
    with pytest.raises(tk.SimulatedCrash):
        crashing.fit()
    cfg = tk.config(*OVERRIDES, "data.num_workers=2")
    resumed = Trainer(tk.model(cfg), tk.processor(), WebDatasetSource(shards), tmp_path, dist=tk.cpu(), progress=False)
    with pytest.raises(ConfigError, match="data.num_workers=2: it read its sharded data with data.num_workers=0.*"
                                          "resume with data.num_workers=0"):
        resumed.fit(resume=True)
    resumed.close()

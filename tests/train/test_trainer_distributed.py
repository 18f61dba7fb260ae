"""Data-parallel training on two CPU processes (gloo) equals one process with 2x accumulation.

Both runs see the same global batch (2 ranks x 1 micro-batch vs 1 rank x 2 micro-batches of
the same samples), so with the loss normalised by the global batch's supervised tokens the
gradients agree, whatever the strategy. Measured on torch 2.14 / CPU: DDP weights equal
bit for bit after 5 steps; FSDP2 (``fully_shard``) within 1e-6. Tolerance: 1e-5.

One micro-batch of rank 1 is entirely unrenderable, so that rank must still run a
(zero-weight) pass for the collectives while the single process simply skips it. FSDP2 runs
on CPU/gloo in torch 2.14, fp16 with a gradient scaler included.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import trainkit as tk

from minivlm.safetensors_io import load_safetensors
from minivlm.train.data import StepBatchSampler
from minivlm.train.distributed import DistributedContext
from minivlm.train.trainer import Trainer

WEIGHT_TOLERANCE = 1e-5
OVERRIDES = ("train.steps=5", "train.save_every=3", "train.keep_checkpoints=0")
STRATEGIES = ("ddp", "fsdp")
SPAWN_TIMEOUT_S = 240


def _dataset() -> tk.ListDataset:
    # Rank 1's micro-batch of step 1 (the single process's second micro-batch of step 1).
    bad = StepBatchSampler(64, 4, 1, world_size=2, rank=1, seed=0).indices(1, 0)
    return tk.with_skipped_micro_batch(list(tk.shapes_samples(64)), bad)


def _worker(rank: int, port: int, root: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    context = DistributedContext.from_env(device="cpu")
    try:
        for strategy in STRATEGIES:
            cfg = tk.config(*OVERRIDES, f"train.fsdp={strategy == 'fsdp'}")
            trainer = Trainer(tk.model(cfg), tk.processor(), _dataset(), root / strategy, dist=context,
                              progress=False)
            result = trainer.fit()
            if rank == 0:
                torch.save({"losses": [h["loss"] for h in result.history], "status": result.status,
                            "skipped": result.skipped_samples}, root / strategy / "result.pt")
        # fp16 under FSDP: each rank sees only its gradient shard, so skipping an overflowing
        # step must be decided from the global norm or the ranks' weights and scales diverge.
        cfg = tk.config("train.steps=5", "train.fsdp=true", "train.precision=fp16")
        trainer = Trainer(tk.model(cfg), tk.processor(), tk.dataset(), root / "fsdp_fp16", dist=context,
                          progress=False)
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
        result = trainer.fit()
        torch.save({"outcomes": [h.get("skipped", "ok") for h in result.history], "scale": trainer.scaler.get_scale(),
                    "losses": [h["loss"] for h in result.history]}, root / "fsdp_fp16" / f"rank{rank}.pt")
    finally:
        context.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(_worker, args=(_free_port(), root), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-process run did not finish within {SPAWN_TIMEOUT_S} s (a collective mismatch?)")
    return root


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, list[float], dict]:
    run_dir = tmp_path_factory.mktemp("single")
    cfg = tk.config(*OVERRIDES, "train.grad_accum=2")
    result = Trainer(tk.model(cfg), tk.processor(), _dataset(), run_dir, dist=tk.cpu(), progress=False).fit()
    return run_dir, [h["loss"] for h in result.history], result.skipped_samples


def _checkpoint_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_safetensors(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors")


def _without_key_bias(name: str, w: torch.Tensor) -> torch.Tensor:
    """The encoder's fused qkv bias without its key third.

    A key bias adds the same ``q . b_k`` to every score of a query, which softmax cancels: its true
    gradient is exactly 0, and what autograd returns is rounding noise (~1e-10) whose sign depends
    on the reduction order. AdamW divides that noise by its own running scale, so the parameter
    takes steps of up to ``lr`` in a direction that differs between one process and two. It is
    checked separately (bounded by the steps taken), not against the fp32 tolerance.
    """
    if not name.endswith("attn.qkv.bias"):
        return w
    third = w.shape[0] // 3
    return torch.cat([w[:third], w[2 * third:]])


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((_without_key_bias(k, a[k]) - _without_key_bias(k, b[k])).abs().max()) for k in a)


def _key_bias_drift(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diffs = [(a[k] - b[k])[a[k].shape[0] // 3: 2 * a[k].shape[0] // 3].abs().max() for k in a
             if k.endswith("attn.qkv.bias")]
    return float(max(diffs)) if diffs else 0.0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_match_one_process_with_twice_the_accumulation(strategy, distributed_root, single):
    single_dir, single_losses, single_skipped = single
    result = torch.load(distributed_root / strategy / "result.pt", weights_only=True)
    assert result["status"] == "finished"
    assert result["losses"] == pytest.approx(single_losses, rel=1e-6)
    # The unrenderable micro-batch is counted once, globally, as in the single process.
    assert result["skipped"] == single_skipped and sum(single_skipped.values()) == 4
    for step in (3, 5):
        ranks, one = _checkpoint_weights(distributed_root / strategy, step), _checkpoint_weights(single_dir, step)
        difference = _max_difference(ranks, one)
        assert difference <= WEIGHT_TOLERANCE, f"{strategy} step {step}: max |dw| = {difference:.2e}"
        # Two AdamW steps of opposite sign per step taken, at most (lr 3e-3, see OVERRIDES' config).
        assert _key_bias_drift(ranks, one) <= 2 * step * tk.config().train.lr


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_checkpoint_written_by_two_ranks_resumes_in_one_process(strategy, distributed_root, single, tmp_path):
    single_dir, single_losses, _ = single
    checkpoint = Path("checkpoints") / "step_000003"
    shutil.copytree(distributed_root / strategy / checkpoint, tmp_path / checkpoint)
    cfg = tk.config(*OVERRIDES, "train.grad_accum=2")
    trainer = Trainer(tk.model(cfg, seed=1), tk.processor(), _dataset(), tmp_path, dist=tk.cpu(), progress=False)
    result = trainer.fit(resume=True)
    assert [h["step"] for h in result.history] == [4, 5]
    assert [h["loss"] for h in result.history] == pytest.approx(single_losses[3:], rel=1e-6)
    resumed = {k: v for k, v in trainer.model.state_dict().items() if k != "decoder.lm_head.weight"}  # tied
    difference = _max_difference(resumed, _checkpoint_weights(single_dir, 5))
    assert difference <= WEIGHT_TOLERANCE


def test_fp16_under_fsdp_skips_overflowing_steps_on_every_rank_alike(distributed_root):
    ranks = [torch.load(distributed_root / "fsdp_fp16" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    outcomes = ranks[0]["outcomes"]
    assert outcomes[0] == "overflow" and "ok" in outcomes
    assert ranks[0]["scale"] == 2.0 ** (20 - outcomes.count("overflow"))


def test_without_torchrun_the_context_is_one_process_and_wraps_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = DistributedContext.from_env(device="cpu")
    assert (context.rank, context.world_size, context.is_main, context.device.type) == (0, 1, True, "cpu")
    assert context.all_reduce_sums(3, 2.5) == (3, 2.5)
    assert context.any_rank(False, True) == (False, True)
    model = tk.model(tk.config())
    assert context.wrap(model, fsdp=True) is model and context.strategy == "none"
    assert context.full_model_state(model) is None

"""Mixed precision on the CPU: bf16 autocast, fp16 autocast with dynamic loss scaling, fp32.

torch 2.14 runs both bf16 and fp16 autocast on the CPU, and ``torch.amp.GradScaler("cpu")``
works, so the fp16 path (scaling, unscaling before clipping, overflow back-off) is tested
here for real rather than only on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import trainkit as tk

from minivlm.train.distributed import DistributedContext
from minivlm.train.precision import autocast, cpu_multiplies_bf16, grad_scaler, resolve_precision
from minivlm.train.trainer import Trainer

CPU = torch.device("cpu")


def _overfit_trainer(tmp_path, precision: str, steps: int = 8) -> Trainer:
    """Four samples, batch 4: every step sees the same batch, so the loss must go down."""
    cfg = tk.config(f"train.precision={precision}", f"train.steps={steps}", "train.warmup_steps=0",
                    "train.schedule=constant", "train.lr=1e-2")
    return Trainer(tk.model(cfg), tk.processor(), tk.dataset(4), tmp_path, dist=tk.cpu(), progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_each_precision_trains_with_decreasing_loss(tmp_path, precision):
    trainer = _overfit_trainer(tmp_path, precision)
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    result = trainer.fit()
    losses = [h["loss"] for h in result.history]
    assert result.status == "finished" and result.skipped_steps == 0
    assert all(loss is not None for loss in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    # Master weights stay fp32 whatever the compute dtype.
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_fp16_overflow_skips_the_step_and_backs_off_the_scale(tmp_path):
    trainer = _overfit_trainer(tmp_path, "fp16", steps=12)
    # At 2^20 the scaled fp16 gradients overflow (max 65504); each overflow halves the scale.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    before = tk.weights(trainer.model)
    result = trainer.fit()
    overflowed = [h["step"] for h in result.history if h.get("skipped") == "overflow"]
    assert overflowed[0] == 1 and len(overflowed) < 12
    assert result.overflow_steps == len(overflowed) and result.skipped_steps == 0
    assert trainer.scaler.get_scale() == 2.0 ** (20 - len(overflowed))  # growth needs 2000 clean steps
    first_param = next(trainer.model.parameters())
    assert trainer.optimizer.state[first_param]["step"] == 12 - len(overflowed)  # skipped steps do not update
    trained = [h["loss"] for h in result.history if "skipped" not in h]
    assert result.status == "finished" and trained[-1] < trained[0]
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_resolve_precision():
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_multiplies_bf16() else "fp32")
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, CPU) == name
    with pytest.raises(ValueError, match="expected one of auto | fp32 | bf16 | fp16, got 'float16'"):
        resolve_precision("float16", CPU)


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"),
                                                               (False, False, "fp32")])
def test_auto_precision_on_the_cpu_follows_its_bf16_instructions(monkeypatch, avx512_bf16, amx, expected):
    # What the hardware can do decides, never how fast it is: the same CPU model always resolves alike.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert cpu_multiplies_bf16() is (avx512_bf16 or amx)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32"  # pinned settings are never overridden


def test_autocast_and_scaler_follow_the_precision():
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(precision, CPU):
            assert linear(x).dtype == dtype
    assert not grad_scaler("bf16", CPU).is_enabled()
    assert grad_scaler("fp16", CPU).is_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains_and_resumes(tmp_path, precision):
    """The GPU path: fused AdamW, a CUDA gradient scaler, device RNG and optimizer state in checkpoints."""
    cfg = tk.config(f"train.precision={precision}", "train.steps=8", "train.save_every=4", "train.warmup_steps=0",
                    "train.schedule=constant", "train.lr=1e-2")

    def trainer(run_dir) -> Trainer:
        return Trainer(tk.model(cfg), tk.processor(), tk.dataset(4), run_dir, dist=DistributedContext.single("cuda"),
                       progress=False)

    straight = trainer(tmp_path / "straight")
    assert straight.optimizer.defaults["fused"] and straight.scaler.is_enabled() == (precision == "fp16")
    losses = [h["loss"] for h in straight.fit().history]
    assert losses[-1] < 0.7 * losses[0]
    crashing = trainer(tmp_path / "resumed")
    tk.crash_after_checkpoint(crashing, step=4)
    with pytest.raises(tk.SimulatedCrash):
        crashing.fit()
    resumed = trainer(tmp_path / "resumed").fit(resume=True)
    # GPU kernels need not be bitwise deterministic; the resumed curve must still follow the original.
    assert [h["loss"] for h in resumed.history] == pytest.approx(losses[4:], rel=1e-3)

"""Shared helpers for the parity tests: non-trivial random weights and a record of measured diffs.

Every parity test reports its fp32 max abs difference through ``record_property`` (visible in
``--junitxml`` output) and in a table printed at the end of the run, so the measured numbers are
part of the test log rather than a claim.
"""
from __future__ import annotations

import pytest
import torch

#: The acceptance bound of the interop issue: fp32 max abs difference against the reference.
TOLERANCE = 1e-4

_MEASURED: list[tuple[str, float]] = []


def perturb_(module: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every parameter in place.

    Reference libraries initialise biases to 0, norms to 1 and class tokens near 0; a mapping
    that swapped two such tensors would still agree. Noise makes every tensor distinguishable.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


@pytest.fixture(scope="session")
def perturb():
    """The :func:`perturb_` helper (session-scoped, so hypothesis tests may use it too)."""
    return perturb_


@pytest.fixture
def parity(record_property):
    """``parity(name, ours, reference)``: assert max |ours - reference| <= TOLERANCE and record it."""

    def check(name: str, ours: torch.Tensor, reference: torch.Tensor) -> float:
        assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(reference.shape)}"
        diff = (ours.float() - reference.float()).abs().max().item()
        record_property(f"max_abs_diff[{name}]", diff)
        _MEASURED.append((name, diff))
        assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.3g} exceeds {TOLERANCE}"
        return diff

    return check


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.section("interop parity: fp32 max abs difference vs the reference library")
        for name, diff in _MEASURED:
            terminalreporter.write_line(f"{diff:10.3e}  {name}")

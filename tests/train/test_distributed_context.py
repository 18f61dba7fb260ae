"""DistributedContext.close: every rank meets at a barrier before any tears its connections down."""

from __future__ import annotations

import torch

from minivlm.train import distributed
from minivlm.train.distributed import DistributedContext


def _record_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    return calls


def test_close_waits_for_every_rank_before_destroying_the_group(monkeypatch):
    calls = _record_calls(monkeypatch)
    DistributedContext(1, 2, 1, torch.device("cpu"), initialized_here=True).close()
    assert calls == ["barrier", "destroy"]


def test_close_leaves_a_group_it_did_not_create(monkeypatch):
    calls = _record_calls(monkeypatch)
    DistributedContext(0, 2, 0, torch.device("cpu"), initialized_here=False).close()
    assert calls == []


def test_close_of_a_single_process_group_needs_no_barrier(monkeypatch):
    calls = _record_calls(monkeypatch)
    DistributedContext(0, 1, 0, torch.device("cpu"), initialized_here=True).close()
    assert calls == ["destroy"]

"""Two DDP ranks (gloo, 2 CPU processes), two DataLoader workers each, read a webdataset through
the trainer's step sampler: every (rank, worker) reads shards no other one reads, one epoch's
union is the dataset exactly once, and a loader resumed at a step reads exactly what the
uninterrupted one read from that step on."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import datakit as sk
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset, get_worker_info

from minivlm.data.webdataset_source import WebDatasetSource
from minivlm.train.data import ShardSampler, step_sampler

SHARDS, PER_SHARD, WORKERS, MICRO, ACCUM = 8, 6, 2, 3, 2
STEPS_PER_EPOCH = SHARDS * PER_SHARD // (2 * MICRO * ACCUM)  # 4


class Observed(Dataset):
    """The source's samples as (caption, DataLoader worker id)."""

    def __init__(self, source: WebDatasetSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, position: int) -> tuple[str, int]:
        return self.source[position]["answer"], get_worker_info().id


def read(source, rank: int, start: int, total: int) -> list[list[tuple[str, int]]]:
    sampler = step_sampler(source, MICRO, ACCUM, world_size=2, rank=rank, workers=WORKERS, start_step=start,
                           total_steps=total, seed=0)
    assert isinstance(sampler, ShardSampler)
    loader = DataLoader(Observed(source), batch_sampler=sampler, num_workers=WORKERS, collate_fn=list,
                        multiprocessing_context="fork")
    return list(loader)


def _rank(rank: int, port: int, spec: str, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        source = WebDatasetSource(spec)
        full = read(source, rank, 0, 2 * STEPS_PER_EPOCH)  # two epochs
        resumed = read(source, rank, 3, 2 * STEPS_PER_EPOCH)
        gathered = [None, None]
        dist.all_gather_object(gathered, {"full": full, "resumed": resumed})
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_read_disjoint_shards_once_per_epoch_and_resume_exactly(tmp_path):
    spec = sk.write_caption_shards(tmp_path / "shards", [PER_SHARD] * SHARDS)
    out = tmp_path / "read.pt"
    mp.start_processes(_rank, args=(_free_port(), spec, out), nprocs=2, join=True, start_method="fork")
    by_rank = torch.load(out, weights_only=False)
    per_step = ACCUM  # micro-batches per rank and step
    for epoch in range(2):
        captions, shards_of = [], {}
        for rank, result in enumerate(by_rank):
            batches = result["full"][epoch * STEPS_PER_EPOCH * per_step:(epoch + 1) * STEPS_PER_EPOCH * per_step]
            for batch in batches:
                for caption, worker in batch:
                    captions.append(caption)
                    shards_of.setdefault((rank, worker), set()).add(caption.split()[0])
        assert sorted(captions) == sorted(f"s{s} r{i}" for s in range(SHARDS) for i in range(PER_SHARD))
        readers = list(shards_of.values())
        assert len(readers) == 4 and sum(map(len, readers)) == len(set().union(*readers)) == SHARDS
    for result in by_rank:
        assert result["resumed"] == result["full"][3 * per_step:]  # same samples, same workers
    first_epoch = [c for r in by_rank for b in r["full"][:STEPS_PER_EPOCH * per_step] for c, _ in b]
    second_epoch = [c for r in by_rank for b in r["full"][STEPS_PER_EPOCH * per_step:] for c, _ in b]
    assert first_epoch != second_epoch  # a new shard order each epoch

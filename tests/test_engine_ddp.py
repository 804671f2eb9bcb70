"""The engine under DDP (gloo, 2 processes) equals one process with the same global batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spark_core import build_spark
from spark_core.data import ImageFolderDataset, build_pretrain_transform, generate_synthetic_dataset
from spark_core.engine import EngineConfig, PretrainEngine
from spark_core.sparse import SparseBatchNorm2d, SyncBatchNorm2d

SIZE = 64
GLOBAL_BATCH = 8


class LossRecorder:
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step(self, metrics) -> None:
        self.losses.append(metrics.loss)

    def on_epoch_end(self, engine, metrics) -> None:
        return None


def _train(root: Path, world_size: int) -> tuple[list[float], dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_spark("resnet18", SIZE, decoder_width=64)
    config = EngineConfig(
        epochs=1,
        batch_size=GLOBAL_BATCH // world_size,
        base_lr=1e-3,
        warmup_epochs=0,
        log_every=1,
        seed=3,
    )
    recorder = LossRecorder()
    engine = PretrainEngine(model, config, callbacks=[recorder])
    dataset = ImageFolderDataset(root, build_pretrain_transform(SIZE), labelled=False)
    engine.fit(dataset)
    synced = sum(isinstance(m, SyncBatchNorm2d) for m in model.modules())
    synced += sum(getattr(m, "sync_stats", False) for m in model.modules())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return recorder.losses, state, synced


def _rank_main(rank: int, world_size: int, root: str, init_file: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        losses, state, synced = _train(Path(root), world_size)
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, losses)
        if rank == 0:
            torch.save({"losses": gathered, "state": state, "synced": synced}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_workers_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(
        tmp_path / "data", num_images=32, image_size=SIZE, num_classes=2, style="textures"
    )
    single_losses, single_state, single_synced = _train(root, world_size=1)
    assert single_synced == 0  # nothing is synchronised without a process group

    out = tmp_path / "ddp.pt"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(
        _rank_main,
        args=(2, str(root), str(tmp_path / "init"), str(out)),
        nprocs=2,
        join=True,
    )
    result = torch.load(out, weights_only=False)
    per_rank = torch.tensor(result["losses"])  # (2, steps)
    # Both ranks report the global batch's loss (the mean over ranks).
    torch.testing.assert_close(per_rank[0], per_rank[1])
    ddp_losses = per_rank[0]
    assert result["synced"] > 0
    assert len(ddp_losses) == len(single_losses) == 4
    torch.testing.assert_close(ddp_losses, torch.tensor(single_losses), rtol=2e-3, atol=1e-4)
    for key, value in single_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-2, atol=2e-4)


def test_synchronize_batch_norms_shares_parameters_and_is_dense_outside_ddp() -> None:
    from spark_core.sparse import synchronize_batch_norms

    model = build_spark("resnet18", SIZE, decoder_width=64)
    before = {name: p for name, p in model.named_parameters()}
    images = torch.randn(4, 3, SIZE, SIZE)
    active = model.generate_mask(4, generator=torch.Generator().manual_seed(0))
    model.eval()
    expected = model(images, active).pred
    changed = synchronize_batch_norms(model)
    assert changed > 0
    assert all(m.sync_stats for m in model.modules() if isinstance(m, SparseBatchNorm2d))
    assert any(isinstance(m, SyncBatchNorm2d) for m in model.decoder.modules())
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    torch.testing.assert_close(model(images, active).pred, expected)
    model.train()
    torch.testing.assert_close(
        model(images, active).loss, build_spark_like(model)(images, active).loss
    )


def build_spark_like(model):
    """A fresh model with ``model``'s weights and plain (unsynchronised) batch norms."""
    twin = build_spark("resnet18", SIZE, decoder_width=64)
    twin.load_state_dict(model.state_dict())
    return twin.train()

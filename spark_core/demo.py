"""A short local SparK pre-training demo on generated images (what ``make run`` runs).

    python -m spark_core.demo [--out .sparkorch/demo] [--epochs 6] [--backbone resnet18]

It writes a labelled synthetic image folder (by default ``style="textures"``: the class is
the orientation of a whole-image periodic pattern), pre-trains SparK on its training
split with the reference recipe (LAMB, warm-up + cosine; labels are never used), saves
reconstruction pictures before and after, exports the encoder in timm's format, and
compares the linear-probe and kNN accuracy on the held-out quarter of the pre-trained
encoder with the same encoder at random initialisation (same probe, data and seed).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from spark_core.checkpoint import export_encoder
from spark_core.data import (
    SYNTHETIC_STYLES,
    ImageFolderDataset,
    build_eval_transform,
    build_loader,
    build_pretrain_transform,
    generate_synthetic_dataset,
    split_train_val,
)
from spark_core.engine import EngineConfig, PretrainEngine, ProgressBar
from spark_core.evaluate import evaluate_encoder
from spark_core.model import build_spark
from spark_core.runtime import keep_freed_memory_in_process
from spark_core.viz import save_reconstruction_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    home = Path(os.environ.get("SPARKORCH_HOME", ".sparkorch"))
    parser = argparse.ArgumentParser(description="Short local SparK pre-training demo.")
    parser.add_argument("--out", type=Path, default=home / "demo")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--style", default="textures", choices=SYNTHETIC_STYLES)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--base-lr", type=float, default=0.1)
    parser.add_argument("--decoder-width", type=int, default=256)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


VAL_FRACTION = 0.25


def _probe(model, args: argparse.Namespace, data_root: Path) -> dict[str, float]:
    dataset = ImageFolderDataset(data_root, build_eval_transform(args.input_size))
    train, val = split_train_val(dataset, val_fraction=VAL_FRACTION, seed=args.seed)
    train_loader = build_loader(train, 64, shuffle=False, drop_last=False)
    val_loader = build_loader(val, 64, shuffle=False, drop_last=False)
    return evaluate_encoder(model, train_loader, val_loader, seed=args.seed)


def _preview_indices(targets: list[int], count: int = 8) -> list[int]:
    """``count`` indices taking classes in turn (class 0, 1, 2, ..., 0, 1, ...)."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(label, []).append(index)
    columns = [by_class[label] for label in sorted(by_class)]
    picked = [c[row] for row in range(max(map(len, columns))) for c in columns if row < len(c)]
    return picked[:count]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    keep_freed_memory_in_process()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    data_root = generate_synthetic_dataset(
        out / f"data-{args.style}",
        num_images=args.images,
        image_size=args.input_size,
        num_classes=args.classes,
        seed=args.seed,
        style=args.style,
    )
    print(
        f"data       {data_root} ({args.images} generated {args.style!r} images, "
        f"{args.classes} classes; pre-training on the {1 - VAL_FRACTION:.0%} training split)"
    )
    model = build_spark(args.backbone, args.input_size, decoder_width=args.decoder_width)
    random_init = _probe(model, args, data_root)

    # Pre-training sees the training split only, unlabelled (labelled=False: every label is -1);
    # both datasets list the same files in the same order, so the split indices carry over.
    clean = ImageFolderDataset(data_root, build_eval_transform(args.input_size))
    train, _ = split_train_val(clean, val_fraction=VAL_FRACTION, seed=args.seed)
    unlabelled = ImageFolderDataset(
        data_root, build_pretrain_transform(args.input_size), labelled=False
    )
    pretrain_set = Subset(unlabelled, train.indices)
    config = EngineConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        base_lr=args.base_lr,
        warmup_epochs=1,
        precision=args.precision,
        seed=args.seed,
        log_every=4,
        checkpoint_dir=str(out / "checkpoints"),
    )
    steps_per_epoch = len(pretrain_set) // args.batch_size
    progress = ProgressBar(args.epochs, steps_per_epoch, args.batch_size)
    engine = PretrainEngine(model, config, callbacks=[progress])
    preview = torch.stack([clean[i][0] for i in _preview_indices(clean.targets)])
    mask_generator = torch.Generator().manual_seed(args.seed)
    before = save_reconstruction_grid(
        model, preview, out / "reconstruction-before.png", generator=mask_generator
    )
    start = time.perf_counter()
    history = engine.fit(pretrain_set)
    elapsed = time.perf_counter() - start
    after = save_reconstruction_grid(
        model, preview, out / "reconstruction.png", generator=mask_generator.manual_seed(args.seed)
    )
    encoder_path = export_encoder(model, out / f"{args.backbone}-spark-encoder.safetensors")
    pretrained = _probe(model, args, data_root)

    print(
        f"loss       {history[0].loss:.4f} (epoch 1) -> {history[-1].loss:.4f} "
        f"(epoch {len(history)}), {elapsed:.0f} s"
    )
    print(f"picture    {after}  (before training: {before})")
    print(f"encoder    {encoder_path}  (timm.create_model({args.backbone!r}) loads it)")
    print(f"checkpoint {engine.checkpoint_path}")
    for key in pretrained:
        print(f"{key:<18} random init {random_init[key]:5.1f}%  ->  SparK {pretrained[key]:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

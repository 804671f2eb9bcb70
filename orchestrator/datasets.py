"""The datasets a spec names: pre-training images, evaluation loaders and preview images.

Synthetic sources are generated on first use under the settings' dataset cache, once per
node (generation is atomic, so workers racing on one node share one copy); folders are read
where they lie (the spec has already checked that they are under a data root). Pre-training
reads them through the spec's ``data.decoder`` (:data:`spark_core.gpu_input.INPUT_DECODERS`):
``gpu`` reads encoded JPEGs, so its synthetic images are generated as JPEG.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from orchestrator.specs import DataSource, FinetuneSpec, PretrainSpec, SyntheticData
from spark_core.data import (
    ImageFolderDataset,
    build_eval_transform,
    build_loader,
    generate_synthetic_dataset,
    split_train_val,
)
from spark_core.gpu_input import input_decoder

#: The format synthetic sources have always been generated in (their cache names omit it).
_DEFAULT_SYNTHETIC_FORMAT = "png"


def materialize(
    source: DataSource, cache: Path, image_format: str = _DEFAULT_SYNTHETIC_FORMAT
) -> Path:
    """The folder holding ``source``'s images (generated first, as ``image_format`` files,
    when synthetic)."""
    if isinstance(source, SyntheticData):
        name = (
            f"synthetic-{source.style}-n{source.count}-s{source.size}-"
            f"c{source.classes}-seed{source.seed}"
        )
        if image_format != _DEFAULT_SYNTHETIC_FORMAT:
            name += f"-{image_format}"
        return generate_synthetic_dataset(
            cache / name,
            num_images=source.count,
            image_size=source.size,
            num_classes=source.classes,
            seed=source.seed,
            style=source.style,
            image_format=image_format,
        )
    return Path(source.path)


def _evaluates(spec: PretrainSpec) -> bool:
    return spec.evaluation.method != "none"


def _labelled(root: Path, spec: PretrainSpec, field: str) -> ImageFolderDataset:
    try:
        return ImageFolderDataset(root, build_eval_transform(spec.model.input_size), labelled=True)
    except ValueError as error:
        raise ValueError(
            f"{field}: evaluation needs labelled images (one sub-folder per class): {error}. "
            "Give a labelled data.eval, or set evaluation.method: none"
        ) from None


def _holdout_split(spec: PretrainSpec, root: Path) -> tuple[Subset, Subset]:
    labelled = _labelled(root, spec, "data.train")
    return split_train_val(labelled, spec.evaluation.val_fraction, seed=spec.seed)


def pretrain_dataset(spec: PretrainSpec, cache: Path) -> Dataset:
    """Unlabelled pre-training images (minus the evaluation hold-out, if any), as
    ``data.decoder`` reads them: augmented tensors (``cpu``), or encoded JPEGs with their
    crops, for the engine to decode and augment on the device (``gpu``)."""
    decoder = input_decoder(spec.data.decoder)
    root = materialize(spec.data.train, cache, decoder.synthetic_format)
    images = decoder.dataset(root, spec.model.input_size)
    if _evaluates(spec) and spec.data.eval is None and spec.data.holdout:
        # Both listings are sorted by path, so the split's indices carry over; so do they
        # between a synthetic source's PNG and JPEG copies (the same names but the suffix),
        # which keeps the probe's split (on the PNGs) out of a gpu decoder's pre-training.
        train, _ = _holdout_split(spec, root)
        return Subset(images, train.indices)
    return images


def evaluation_loaders(spec: PretrainSpec, cache: Path):
    """``(train_loader, val_loader)`` of labelled, un-augmented images for the probe."""
    if spec.data.eval is not None:
        root = materialize(spec.data.eval, cache)
        train, val = split_train_val(
            _labelled(root, spec, "data.eval"), spec.evaluation.val_fraction, seed=spec.seed
        )
    else:
        train, val = _holdout_split(spec, materialize(spec.data.train, cache))
    batch = spec.evaluation.batch_size
    return (
        build_loader(train, batch, shuffle=False, drop_last=False),
        build_loader(val, batch, shuffle=False, drop_last=False),
    )


def preview_images(spec: PretrainSpec, cache: Path, count: int) -> torch.Tensor:
    """``(count, 3, H, W)`` fixed, un-augmented images for reconstruction pictures."""
    source = spec.data.eval or spec.data.train
    root = materialize(source, cache)
    images = ImageFolderDataset(root, build_eval_transform(spec.model.input_size))
    step = max(len(images) // count, 1)
    picks = list(range(0, len(images), step))[:count]
    return torch.stack([images[i][0] for i in picks])


def steps_per_epoch(dataset_size: int, spec: PretrainSpec) -> int:
    """Optimiser steps per epoch (DistributedSampler and loader both drop the remainder)."""
    workers = spec.resources.num_workers
    return (dataset_size // workers) // spec.derived().per_worker_batch


def finetune_datasets(spec: FinetuneSpec, cache: Path) -> tuple[Dataset, Dataset, list[str]]:
    """``(train, val, class names)`` of a fine-tuning job, with the protocol's transforms.

    Without ``data.val`` the validation images are a stratified ``data.val_fraction`` of
    ``data.train`` (seeded by ``data.split_seed``, so that the seeds of a sweep score on the
    same images), never trained on.

    Raises:
        ValueError: a folder is not in the class layout, or train and val name different
            classes.
    """
    from spark_core.finetune import eval_transform, train_transform

    size = spec.model.input_size
    train_root = materialize(spec.data.train, cache)
    train = _finetune_folder(train_root, train_transform(size), "data.train")
    if spec.data.val is None:
        kept, held_out = split_train_val(train, spec.data.val_fraction, seed=spec.data.split_seed)
        evaluated = _finetune_folder(train_root, eval_transform(size), "data.train")
        return Subset(train, kept.indices), Subset(evaluated, held_out.indices), train.classes
    val = _finetune_folder(materialize(spec.data.val, cache), eval_transform(size), "data.val")
    if val.classes != train.classes:
        raise ValueError(
            f"data.val has classes {val.classes[:10]}, data.train {train.classes[:10]}: both "
            "need the same class sub-folders"
        )
    return train, val, train.classes


def _finetune_folder(root: Path, transform, field: str) -> ImageFolderDataset:
    try:
        return ImageFolderDataset(root, transform, labelled=True)
    except ValueError as error:
        raise ValueError(
            f"{field}: fine-tuning needs labelled images (one sub-folder per class): {error}"
        ) from None

"""The fine-tuning protocol's timm building blocks and engine, against the reference's facts
(docs/finetune-recipe.md): transforms, Mixup/CutMix and smoothing, losses, optimiser
arguments, evaluation epochs, EMA, accuracy and exact resume."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lamb
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from spark_core.data import ImageFolderDataset, generate_synthetic_dataset
from spark_core.finetune import (
    build_criterion,
    build_finetune_optimizer,
    build_mixup,
    eval_transform,
    even_batch,
    finetune_param_groups,
    finetune_recipe,
    train_transform,
)
from spark_core.finetune_engine import (
    FinetuneConfig,
    FinetuneEngine,
    evaluated_epochs,
    read_finetune_checkpoint,
    top_k_correct,
)

SIZE = 32  # resnet18's smallest input (1 x 1 last feature map): fast


def test_eval_transform_resizes_to_size_over_0_95_then_crops_the_centre() -> None:
    steps = eval_transform(224).transforms
    resize, crop = steps[0], steps[1]
    assert isinstance(resize, transforms.Resize) and resize.size == 235  # floor(224 / 0.95)
    assert resize.interpolation == InterpolationMode.BICUBIC
    assert isinstance(crop, transforms.CenterCrop) and tuple(crop.size) == (224, 224)
    # At 384 px the reference squashes to a square, without cropping.
    squash = eval_transform(384).transforms
    assert squash[0].size == (384, 384) and not any(
        isinstance(t, transforms.CenterCrop) for t in squash
    )
    image = Image.new("RGB", (500, 375), (120, 30, 200))
    assert eval_transform(224)(image).shape == (3, 224, 224)


def test_train_transform_is_the_reference_pipeline() -> None:
    names = [type(t).__name__ for t in train_transform(224).transforms]
    assert names == [
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "TrivialAugmentWide",  # replaces timm's AutoAugment below 384 px
        "MaybeToTensor",
        "Normalize",
        "RandomErasing",
    ]
    crop, flip, trivial, *_, erasing = train_transform(224).transforms
    assert crop.scale == (0.08, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    assert flip.p == 0.5 and trivial.interpolation == InterpolationMode.BICUBIC
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)
    assert "AutoAugment" in [type(t).__name__ for t in train_transform(384).transforms]
    image = Image.new("RGB", (500, 375), (10, 200, 40))
    assert train_transform(SIZE)(image).shape == (3, SIZE, SIZE)


@pytest.mark.parametrize("backbone", ["resnet50", "convnext_small"])
def test_mixup_and_smoothing_settings(backbone: str) -> None:
    recipe, _ = finetune_recipe(backbone)
    mixup = build_mixup(recipe, num_classes=1000)
    assert isinstance(mixup, Mixup)
    assert mixup.mixup_alpha == recipe.mixup == (0.1 if backbone == "resnet50" else 0.8)
    assert (mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob) == (1.0, 1.0, 0.5)
    assert (mixup.mode, mixup.label_smoothing, mixup.mixup_enabled) == ("batch", 0.1, True)
    # Smoothed one-hot targets: 0.1 / 1000 off, 1 - 0.1 + 0.1 / 1000 on, mixed by lambda.
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _, targets = mixup(images.clone(), labels)
    assert targets.shape == (4, 1000)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    assert math.isclose(targets[:, 10:].max().item(), 1e-4, rel_tol=1e-5)
    disabled = build_mixup(dataclasses.replace(recipe, mixup=0.0), num_classes=10)
    mixed, targets = disabled(images.clone(), labels)
    assert torch.equal(mixed, images)  # not mixed, but still smoothed
    assert math.isclose(targets[0, 0].item(), 1 - 0.1 + 0.01, rel_tol=1e-6)


def test_odd_batches_repeat_their_first_sample() -> None:
    images, labels = torch.arange(3.0).view(3, 1), torch.tensor([5, 6, 7])
    even_images, even_labels = even_batch(images, labels)
    assert even_images.flatten().tolist() == [0.0, 0.0, 1.0, 2.0]
    assert even_labels.tolist() == [5, 5, 6, 7]
    assert even_batch(images[:2], labels[:2])[0].shape[0] == 2


def test_losses_and_optimisers_follow_the_recipe() -> None:
    lamb_recipe, _ = finetune_recipe("resnet50")
    adamw_recipe, _ = finetune_recipe("convnext_small")
    bce = build_criterion(lamb_recipe)
    assert isinstance(bce, BinaryCrossEntropy) and bce.smoothing == 0.0
    assert bce.target_threshold is None
    assert isinstance(build_criterion(adamw_recipe), SoftTargetCrossEntropy)

    model = timm.create_model("resnet50", num_classes=10, device="meta")
    groups = finetune_param_groups(model, "resnet50", lr_scale=0.7, weight_decay=0.02)
    lamb = build_finetune_optimizer(groups, lamb_recipe)
    assert isinstance(lamb, Lamb)
    defaults = lamb.defaults
    assert (defaults["max_grad_norm"], defaults["always_adapt"]) == (1e7, True)
    assert defaults["bias_correction"] is False
    assert (defaults["betas"], defaults["eps"]) == ((0.9, 0.999), 1e-6)
    assert [g["lr_scale"] for g in lamb.param_groups] == [g["lr_scale"] for g in groups]
    adamw = build_finetune_optimizer(groups, adamw_recipe)
    assert isinstance(adamw, torch.optim.AdamW)
    assert (adamw.defaults["betas"], adamw.defaults["eps"]) == ((0.9, 0.999), 1e-8)


def test_evaluated_epochs_are_the_references() -> None:
    # range(0, ep // 3, 5) | range(ep // 3, ep)
    assert evaluated_epochs(300) == frozenset(range(0, 100, 5)) | frozenset(range(100, 300))
    assert evaluated_epochs(3) == frozenset({0, 1, 2})
    assert evaluated_epochs(1) == frozenset({0})


def test_top_k_counts() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    # Top-1: only the first; top-5 is capped at 3 classes: all three.
    assert top_k_correct(logits, labels).tolist() == [1, 3]


# ------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("finetune") / "data",
        num_images=32, image_size=SIZE, num_classes=4, seed=0, style="textures",
    )  # fmt: skip


def tiny_config(**recipe_overrides) -> FinetuneConfig:
    recipe, _ = finetune_recipe("resnet18", SIZE)
    fields = {"batch_size": 8, "epochs": 2, "warmup_epochs": 1, "base_lr": 0.02}
    recipe = dataclasses.replace(recipe, **{**fields, **recipe_overrides})
    return FinetuneConfig("resnet18", 4, recipe, log_every=2, seed=1)


def new_engine(config: FinetuneConfig, callbacks=()) -> FinetuneEngine:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4, drop_path_rate=config.recipe.drop_path)
    return FinetuneEngine(model, config, callbacks=callbacks)


def datasets(root: Path):
    return (
        ImageFolderDataset(root, train_transform(SIZE), labelled=True),
        ImageFolderDataset(root, eval_transform(SIZE), labelled=True),
    )


class StopAfter:
    """Saves the training state after an epoch, then stops the run (a crash)."""

    def __init__(self, epoch: int, path: Path) -> None:
        self.epoch, self.path = epoch, path

    def on_step(self, metrics) -> None:
        return None

    def on_epoch_end(self, engine: FinetuneEngine, metrics) -> None:
        if metrics.epoch == self.epoch:
            engine.save(self.path)
            raise KeyboardInterrupt


def test_resumed_run_equals_the_uninterrupted_one(images: Path, tmp_path: Path) -> None:
    train, val = datasets(images)
    straight = new_engine(tiny_config())
    summary = straight.fit(train, val)

    checkpoint = tmp_path / "finetune.pt"
    with pytest.raises(KeyboardInterrupt):
        new_engine(tiny_config(), callbacks=[StopAfter(0, checkpoint)]).fit(train, val)
    resumed = new_engine(tiny_config())
    assert resumed.resume(checkpoint) and resumed.epoch == 1
    assert resumed.fit(train, val) == summary

    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, value in straight.ema.module.state_dict().items():
        assert torch.equal(value, resumed.ema.module.state_dict()[name]), name


def test_summary_is_the_best_of_model_and_ema(images: Path, tmp_path: Path) -> None:
    train, val = datasets(images)
    engine = new_engine(tiny_config(ema_decay=0.5))
    summary = engine.fit(train, val)
    after_epochs = [h["eval"] for h in engine.history if h["eval"]]
    assert len(after_epochs) == 2  # 2 epochs: both evaluated
    # As the reference, the evaluation before training counts too.
    assert summary.initial is not None
    evaluated = [dataclasses.asdict(summary.initial), *after_epochs]
    best = max(max(e["top1"], e["ema_top1"]) for e in evaluated)
    assert summary.finetune_top1 == best
    assert summary.best_model_top1 == max(e["top1"] for e in evaluated)
    assert summary.best_ema_top1 == max(e["ema_top1"] for e in evaluated)
    assert summary.last is not None and summary.last.top1 == after_epochs[-1]["top1"]
    # The best weights are those of the network that scored it.
    path = engine.save(tmp_path / "state.pt")
    state = read_finetune_checkpoint(path)
    scorer = engine.ema.module if summary.best_source == "ema" else engine.model
    check = timm.create_model("resnet18", num_classes=4)
    check.load_state_dict(state["best"])
    loader = engine.eval_loader(val)
    engine.model, engine.ema.module = check, check
    again = engine.evaluate(loader)
    assert again.top1 == pytest.approx(summary.finetune_top1)
    assert scorer is not None


def test_steps_log_without_host_syncs_per_step(images: Path) -> None:
    """Step metrics come in windows of log_every; the lr follows the schedule."""
    seen = []

    class Recorder:
        def on_step(self, metrics) -> None:
            seen.append(metrics)

        def on_epoch_end(self, engine, metrics) -> None:
            return None

    train, val = datasets(images)
    config = tiny_config()
    engine = new_engine(config, callbacks=[Recorder()])
    engine.fit(train, val)
    assert [m.step for m in seen] == list(range(engine.global_step))
    peak = config.recipe.peak_lr(8)
    assert seen[0].lr == pytest.approx(0.005 * peak)
    assert seen[-1].lr == pytest.approx(0.001 * peak)


def test_rejects_a_checkpoint_of_another_model(images: Path, tmp_path: Path) -> None:
    engine = new_engine(tiny_config(epochs=1))
    path = engine.save(tmp_path / "other.pt")
    other = dataclasses.replace(tiny_config(epochs=1), num_classes=5)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5)
    with pytest.raises(ValueError, match="4 classes"):
        FinetuneEngine(model, other).resume(path)


def test_repeated_augmentation_draws_each_repeat_anew(images: Path) -> None:
    train, _ = datasets(images)
    engine = new_engine(tiny_config(rep_aug=3))
    loader = engine.train_loader(train)
    engine._seed_epoch(loader, 0)
    keys = list(loader.sampler)
    assert [index for index, _ in keys[:3]] == [keys[0][0]] * 3  # one image, three times
    assert [position for _, position in keys[:3]] == [0, 1, 2]
    batch, labels = next(iter(loader))
    assert labels[0] == labels[1] == labels[2]
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[1], batch[2])

"""Downstream evaluation: linear probe, kNN, feature extraction, fine-tune, evaluate_encoder."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TEST_DECODER_WIDTH, TEST_SIZE
from torch.utils.data import DataLoader

from spark_core import build_spark
from spark_core.checkpoint import encoder_state_dict
from spark_core.data import (
    ImageFolderDataset,
    build_eval_transform,
    build_loader,
    generate_synthetic_dataset,
)
from spark_core.evaluate import (
    EVAL_METHODS,
    evaluate_encoder,
    extract_features,
    knn_top1,
    linear_probe,
    spark_feature_fn,
    timm_feature_fn,
)

NUM_CLASSES = 4
DIM = 512


pytestmark = pytest.mark.usefixtures("single_thread")


def gaussian_clusters(
    n_train: int = 400, n_val: int = 200, seed: int = 0, random_labels: bool = False
) -> tuple[torch.Tensor, ...]:
    """Separable Gaussian clusters (unit noise, well-spread centres) in DIM dimensions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, DIM, generator=g) * 0.3

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        feats = centres[labels] + torch.randn(n, DIM, generator=g)
        if random_labels:
            labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        return feats, labels

    return (*draw(n_train), *draw(n_val))


# --------------------------------------------------------------------------- frozen features


def test_separable_clusters_are_learned() -> None:
    # 400 x 512 features: ~0.05 s for the probe on an idle 2-core CPU. Not timed here: tiny
    # OpenMP ops slow down by orders of magnitude when other processes hold the cores.
    data = gaussian_clusters()
    assert linear_probe(*data) > 90.0
    assert knn_top1(*data) > 90.0


def test_random_labels_give_chance() -> None:
    data = gaussian_clusters(random_labels=True)
    chance = 100.0 / NUM_CLASSES
    assert abs(linear_probe(*data) - chance) < 15.0
    assert abs(knn_top1(*data) - chance) < 15.0


def test_linear_probe_is_deterministic_for_a_seed() -> None:
    data = gaussian_clusters(n_train=200, n_val=100, random_labels=True)
    a = linear_probe(*data, epochs=20, batch_size=32, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    b = linear_probe(*data, epochs=20, batch_size=32, seed=3)
    assert a == b


def test_knn_with_k_larger_than_train_set() -> None:
    train_feats, train_labels, val_feats, val_labels = gaussian_clusters(n_train=12, n_val=50)
    acc = knn_top1(train_feats, train_labels, val_feats, val_labels, k=1000)
    assert 0.0 <= acc <= 100.0
    # k = N: every train sample votes, the nearest ones heaviest.
    assert acc == knn_top1(train_feats, train_labels, val_feats, val_labels, k=12)


def test_bad_feature_arguments_raise() -> None:
    train_feats, train_labels, val_feats, val_labels = gaussian_clusters(n_train=20, n_val=10)
    with pytest.raises(ValueError, match="val_feats"):
        knn_top1(train_feats, train_labels, val_feats[:, :10], val_labels)
    with pytest.raises(ValueError, match="train_labels"):
        linear_probe(train_feats, train_labels[:5], val_feats, val_labels)
    with pytest.raises(ValueError, match="k must"):
        knn_top1(train_feats, train_labels, val_feats, val_labels, k=0)


# --------------------------------------------------------------------------- SparK encoder


@pytest.fixture(scope="module")
def tiny_loaders(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataLoader, DataLoader]:
    root = generate_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic") / "data", num_images=16, image_size=64, num_classes=2
    )
    dataset = ImageFolderDataset(root, build_eval_transform(TEST_SIZE))
    train = build_loader(dataset, 8, shuffle=True, seed=0, drop_last=False)
    val = build_loader(dataset, 8, shuffle=False, drop_last=False)
    return train, val


def small_model() -> torch.nn.Module:
    return build_spark("resnet18", TEST_SIZE, decoder_width=TEST_DECODER_WIDTH)


def test_spark_features_are_pooled_dense_encoder_features(tiny_loaders) -> None:
    _, loader = tiny_loaders
    model = small_model().train()
    feats, labels = extract_features(spark_feature_fn(model), loader)
    assert feats.shape == (16, 512) and feats.dtype == torch.float32
    assert labels.shape == (16,) and set(labels.tolist()) == {0, 1}
    assert model.training and all(m.training for m in model.modules())
    # All-visible sparse encoder in eval mode == the dense timm backbone.
    dense = timm.create_model("resnet18", num_classes=0)
    dense.load_state_dict(encoder_state_dict(model), strict=False)
    dense_feats, _ = extract_features(timm_feature_fn(dense), loader)
    torch.testing.assert_close(feats, dense_feats, rtol=1e-4, atol=1e-4)


def test_evaluate_encoder_returns_scores_and_restores_mode(tiny_loaders) -> None:
    train, val = tiny_loaders
    model = small_model().train()
    model.encoder.model.bn1.eval()  # a mixed train/eval state must survive too
    scores = evaluate_encoder(model, train, val)
    assert set(scores) == {"linear_probe_top1", "knn_top1"}
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    assert model.training and not model.encoder.model.bn1.training
    assert model.encoder.model.layer1.training


def test_unknown_method_raises(tiny_loaders) -> None:
    train, val = tiny_loaders
    with pytest.raises(ValueError, match="allowed values are") as excinfo:
        evaluate_encoder(small_model(), train, val, methods=("linear_probe", "svm"))
    assert all(name in str(excinfo.value) for name in EVAL_METHODS)

"""SparK computes what the reference computes: each property of DESIGN.md section 2."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from conftest import TEST_DECODER_WIDTH, TEST_SIZE, make_images, perturb_norms_and_biases_
from torch import nn

from spark_core import build_spark
from spark_core.masking import upsample_mask
from spark_core.sparse import SparseBatchNorm2d


def small_spark(backbone: str, **kwargs) -> nn.Module:
    """A small SparK with non-trivial biases and norm affines (see perturb_norms_and_biases_)."""
    kwargs.setdefault("decoder_width", TEST_DECODER_WIDTH)
    return perturb_norms_and_biases_(build_spark(backbone, TEST_SIZE, **kwargs))


def masked_part(feature: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return feature.masked_fill(upsample_mask(active, tuple(feature.shape[2:])), 0)


def visible_part(feature: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return feature.masked_fill(~upsample_mask(active, tuple(feature.shape[2:])), 0)


# --------------------------------------------------------------------------- masks


def test_generate_mask_keeps_exact_visible_count() -> None:
    model = build_spark("resnet18", 224, decoder_width=TEST_DECODER_WIDTH)
    active = model.generate_mask(8, generator=torch.Generator().manual_seed(3))
    assert active.dtype == torch.bool and active.shape == (8, 1, 7, 7)
    assert active.flatten(1).sum(1).tolist() == [20] * 8  # 49 patches, ratio 0.6
    again = model.generate_mask(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(active, again)
    assert not torch.equal(active[0], active[1])


# --------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_masked_positions_are_exactly_zero_at_every_scale(backbone: str, mode: str) -> None:
    model = small_spark(backbone).train(mode == "train")
    images = make_images()
    active = model.generate_mask(images.shape[0])
    features = model.encode(images, active)
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]
    for feature in features:
        assert torch.count_nonzero(masked_part(feature, active)) == 0
        assert torch.count_nonzero(visible_part(feature, active)) > 0


def test_masks_are_upsampled_once_per_resolution_per_forward(
    backbone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import spark_core.masking

    sizes: list[tuple[int, int]] = []
    upsample = spark_core.masking.upsample_mask

    def counting_upsample(active: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        sizes.append(tuple(size))
        return upsample(active, size)

    monkeypatch.setattr(spark_core.masking, "upsample_mask", counting_upsample)
    model = small_spark(backbone).train()
    for _ in range(2):
        sizes.clear()
        model(make_images())
        assert len(sizes) == len(set(sizes)) >= 4  # strides 4 to 32, each once


def test_visible_features_do_not_depend_on_masked_pixels(backbone: str) -> None:
    model = small_spark(backbone).train()
    twin = copy.deepcopy(model)
    images = make_images()
    active = model.generate_mask(images.shape[0])
    pixel_mask = upsample_mask(active, (TEST_SIZE, TEST_SIZE))
    changed = torch.where(pixel_mask, images, 100 * torch.randn_like(images))
    for a, b in zip(model.encode(images, active), twin.encode(changed, active), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_all_visible_sparse_encoder_equals_dense_timm_model(backbone: str, mode: str) -> None:
    model = small_spark(backbone)
    dense = timm.create_model(backbone, num_classes=0)
    _, unexpected = dense.load_state_dict(model.encoder.model.state_dict(), strict=False)
    assert not unexpected
    if mode == "eval":  # give BN non-trivial running statistics first
        model.train()
        model(make_images(seed=5))
        dense.load_state_dict(model.encoder.model.state_dict(), strict=False)
    model.train(mode == "train")
    dense.train(mode == "train")
    images = make_images()
    all_visible = torch.ones(images.shape[0], 1, 2, 2, dtype=torch.bool)
    sparse_features = model.encode(images, all_visible)
    dense_features = dense.forward_intermediates(
        images, indices=model.encoder.feature_indices, intermediates_only=True
    )
    for s, d in zip(sparse_features, dense_features, strict=True):
        torch.testing.assert_close(s, d, rtol=1e-4, atol=1e-4)


def test_batch_norm_statistics_come_from_visible_positions_only() -> None:
    model = small_spark("resnet18").train()
    twin = copy.deepcopy(model)
    images = make_images(batch=4)
    active = model.generate_mask(4)
    # Two extra samples with nothing visible must change nothing for the first four.
    padded_images = torch.cat([images, make_images(batch=2, seed=9)])
    padded_active = torch.cat([active, torch.zeros(2, 1, 2, 2, dtype=torch.bool)])
    features = model.encode(images, active)
    padded = twin.encode(padded_images, padded_active)
    for a, b in zip(features, padded, strict=True):
        torch.testing.assert_close(a, b[:4], rtol=1e-4, atol=1e-5)
    for (name, buf), (_, twin_buf) in zip(
        model.encoder.model.named_buffers(), twin.encoder.model.named_buffers(), strict=True
    ):
        if "running" in name:
            torch.testing.assert_close(buf, twin_buf, rtol=1e-4, atol=1e-6, msg=name)


def test_sparse_batch_norm_matches_batch_norm_on_gathered_visible_rows() -> None:
    model = small_spark("resnet18").train()
    bn = model.encoder.model.bn1
    assert isinstance(bn, SparseBatchNorm2d)
    reference = nn.BatchNorm1d(bn.num_features).train()
    reference.load_state_dict(bn.state_dict())
    x = torch.randn(4, bn.num_features, 32, 32) * 3 + 1
    active = model.generate_mask(4)
    with model.mask_context.use(active):
        out = bn(x)
    mask = upsample_mask(active, (32, 32))[:, 0]
    rows = x.permute(0, 2, 3, 1)[mask]  # the reference's gather of visible rows
    expected_rows = reference(rows)
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[mask], expected_rows, rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(out.permute(0, 2, 3, 1)[~mask]) == 0
    torch.testing.assert_close(bn.running_mean, reference.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, reference.running_var, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- densify / decoder


def _densify_inputs(model: nn.Module, images: torch.Tensor, active: torch.Tensor) -> list:
    captured: list[torch.Tensor] = []
    handles = [
        proj.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        for proj in model.densify_projs
    ]
    try:
        model(images, active)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def test_mask_tokens_fill_masked_positions(backbone: str) -> None:
    model = small_spark(backbone).train()
    images = make_images()
    active = model.generate_mask(images.shape[0])
    for level, densified in enumerate(_densify_inputs(model, images, active)):
        token = model.mask_tokens[level].detach().view(-1)
        mask = upsample_mask(active, tuple(densified.shape[2:]))[:, 0]
        masked_rows = densified.permute(0, 2, 3, 1)[~mask]
        assert torch.equal(masked_rows, token.expand_as(masked_rows))
    assert all(t.abs().max() <= 0.02 for t in model.mask_tokens)


def test_without_mask_token_masked_positions_stay_zero(backbone: str) -> None:
    model = small_spark(backbone, mask_token=False).train()
    assert len(model.mask_tokens) == 0
    images = make_images()
    active = model.generate_mask(images.shape[0])
    for densified in _densify_inputs(model, images, active):
        assert torch.count_nonzero(masked_part(densified, active)) == 0


def test_densify_projection_kernels() -> None:
    model = small_spark("resnet18")  # widths 512, 256, 128, 64 vs decoder 128, 64, 32, 16
    kernels = [p.kernel_size for p in model.densify_projs]
    assert kernels == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert [p.out_channels for p in model.densify_projs] == [128, 64, 32, 16]
    matching = build_spark("resnet18", TEST_SIZE, decoder_width=512)
    assert isinstance(matching.densify_projs[0], nn.Identity)
    assert [p.kernel_size for p in list(matching.densify_projs)[1:]] == [(3, 3)] * 3


def test_decoder_blocks_widths_and_depth() -> None:
    for depth in (1, 2, 3):
        model = small_spark("resnet18", decoder_depth=depth)
        blocks = model.decoder.dec
        assert len(blocks) == 5
        assert [b.up_sample.in_channels for b in blocks] == [128, 64, 32, 16, 8]
        assert [b.conv[-2].out_channels for b in blocks] == [64, 32, 16, 8, 4]
        convs = [m for b in blocks for m in b.conv if isinstance(m, nn.Conv2d)]
        assert all(c.kernel_size == (3, 3) for c in convs)
        assert len(convs) == 5 * depth
        assert model.decoder.proj.out_channels == 3
        out = model(make_images())
        assert out.pred.shape == (4, 3, TEST_SIZE, TEST_SIZE)


def test_hierarchy_one_feeds_only_the_smallest_map() -> None:
    model = small_spark("resnet18", hierarchy=1).train()
    assert len(model.densify_projs) == 1
    images = make_images()
    active = model.generate_mask(images.shape[0])
    inputs = _densify_inputs(model, images, active)
    assert [t.shape[-1] for t in inputs] == [2]
    # The decoder gets the smallest map alone: no skip from a larger map is added.
    decoder_inputs = []
    model.decoder.register_forward_pre_hook(lambda m, a: decoder_inputs.append(a[0]))
    model(images, active)
    assert [t.shape[-1] for t in decoder_inputs[0]] == [2]


# --------------------------------------------------------------------------- loss


def test_loss_is_masked_per_patch_normalised_mse(backbone: str) -> None:
    model = small_spark(backbone).train()
    images = make_images()
    active = model.generate_mask(images.shape[0])
    out = model(images, active)
    out.pred.retain_grad()
    p = 32
    patches = images.reshape(4, 3, 2, p, 2, p).permute(0, 2, 4, 3, 5, 1).reshape(4, 4, -1)
    target = (patches - patches.mean(-1, keepdim=True)) / (
        patches.var(-1, keepdim=True) + 1e-6
    ).sqrt()
    pred = out.pred.detach().reshape(4, 3, 2, p, 2, p).permute(0, 2, 4, 3, 5, 1).reshape(4, 4, -1)
    per_patch = ((pred - target) ** 2).mean(-1)
    masked = (~active).flatten(1).float()
    expected = (per_patch * masked).sum() / masked.sum()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    grad_visible = out.pred.grad.masked_fill(~upsample_mask(active, (TEST_SIZE, TEST_SIZE)), 0)
    assert torch.count_nonzero(grad_visible) == 0
    assert torch.count_nonzero(out.pred.grad) > 0


def test_loss_without_norm_pix_is_plain_mse() -> None:
    model = small_spark("resnet18", norm_pix_loss=False).train()
    images = make_images()
    active = model.generate_mask(4)
    out = model(images, active)
    pixel_masked = ~upsample_mask(active, (TEST_SIZE, TEST_SIZE))
    expected = ((out.pred - images) ** 2).mean(1, keepdim=True)[pixel_masked].mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_samples_without_visible_patches_are_accepted(backbone: str) -> None:
    model = small_spark(backbone).train()
    images = make_images()
    active = model.generate_mask(4)
    active[1] = False
    active[2] = True
    out = model(images, active)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    nothing_visible = torch.zeros(4, 1, 2, 2, dtype=torch.bool)
    assert torch.isfinite(model(images, nothing_visible).loss)


def test_reconstruct_pastes_visible_patches() -> None:
    model = small_spark("resnet18")
    images = make_images()
    active = model.generate_mask(4)
    inp, masked, rec = model.reconstruct(images, active)
    pixel_mask = upsample_mask(active, (TEST_SIZE, TEST_SIZE)).expand_as(images)
    assert torch.equal(inp, images)
    assert torch.equal(masked[~pixel_mask], torch.zeros_like(masked[~pixel_mask]))
    assert torch.equal(rec[pixel_mask], images[pixel_mask])
    assert model.training  # mode restored


# --------------------------------------------------------------------------- ablations


def test_dense_masking_lets_masked_positions_become_nonzero(backbone: str) -> None:
    model = small_spark(backbone, sparse=False).train()
    images = make_images()
    active = model.generate_mask(4)
    features = model.encode(images, active)
    assert all(torch.count_nonzero(masked_part(f, active)) > 0 for f in features)
    encoder_modules = list(model.encoder.modules())
    assert not any(type(m).__module__ == "spark_core.sparse" for m in encoder_modules)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in encoder_modules)


# --------------------------------------------------------------------------- isolation


def test_two_models_with_different_masks_do_not_interfere() -> None:
    a, b = small_spark("resnet18").eval(), small_spark("resnet18").eval()
    images = make_images()
    mask_a = a.generate_mask(4, generator=torch.Generator().manual_seed(1))
    mask_b = b.generate_mask(4, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(mask_a, mask_b)
    alone = [f.clone() for f in a.encode(images, mask_a)]
    nested: list[list[torch.Tensor]] = []
    # Run model A *inside* model B's forward: with a shared global mask this would break.
    b.encoder.model.layer2.register_forward_hook(
        lambda m, args, out: nested.append(a.encode(images, mask_a))
    )
    b_features = b.encode(images, mask_b)
    for x, y in zip(alone, nested[0], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for f in b_features:
        assert torch.count_nonzero(masked_part(f, mask_b)) == 0


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"backbone": "vit_base_patch16_224"}, "Supported families"),
        ({"backbone": "resnet_does_not_exist"}, "not a timm model"),
        ({"input_size": 100}, "input_size"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"hierarchy": 5}, "hierarchy"),
        ({"hierarchy": 0}, "hierarchy"),
        ({"decoder_depth": 0}, "decoder_depth"),
        ({"decoder_width": 100}, "decoder_width"),
        ({"densify_norm": "gn"}, "densify_norm"),
        # 64 px is a 2x2 grid: 0.1 keeps all 4 patches (loss always 0), 0.9 keeps none.
        ({"mask_ratio": 0.1}, "mask_ratio=0.1 with input_size=.*4 of 4 patches.*nothing is masked"),
        ({"mask_ratio": 0.9}, "mask_ratio=0.9 with input_size=.*0 of 4 patches.*sees nothing"),
        ({"input_size": 32}, "0 of 1 patch stay visible"),
        # Look-alikes are refused, not coerced ("False" would have meant True).
        ({"sparse": "False"}, "sparse='False': must be True or False"),
        ({"mask_token": 0}, "mask_token=0: must be True or False"),
        ({"norm_pix_loss": None}, "norm_pix_loss=None"),
        ({"decoder_depth": 2.5}, "decoder_depth=2.5: must be an integer"),
        ({"hierarchy": True}, "hierarchy=True: must be an integer"),
        ({"mask_ratio": "0.6"}, "mask_ratio='0.6': must be a number"),
        ({"input_size": (64.0, 64)}, "input_size"),
        ({"input_size": "64"}, "input_size"),
        ({"backbone": "resnet18.no_such_tag"}, "not a timm model"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, needle: str) -> None:
    args = {"backbone": "resnet18", "input_size": TEST_SIZE, **kwargs}
    with pytest.raises(ValueError, match=needle):
        build_spark(args.pop("backbone"), args.pop("input_size"), **args)


def test_numpy_scalars_and_pretrained_tags_are_accepted() -> None:
    model = build_spark(
        "resnet18.a1_in1k",
        np.int64(TEST_SIZE),
        mask_ratio=np.float64(0.75),
        decoder_depth=np.int64(1),
    )
    assert model.config.backbone == "resnet18.a1_in1k"
    assert type(model.config.mask_ratio) is float and type(model.config.decoder_depth) is int
    assert model.config.input_size == (TEST_SIZE, TEST_SIZE)


def test_a_sparse_layer_run_outside_the_forward_pass_says_why() -> None:
    model = small_spark("resnet18")
    with pytest.raises(
        RuntimeError, match=r"outside a masked forward pass.*[Gg]radient checkpointing"
    ):
        model.encoder(make_images())


def test_bad_mask_is_rejected() -> None:
    model = small_spark("resnet18")
    with pytest.raises(ValueError, match="active"):
        model(make_images(), torch.ones(4, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="active"):
        model(make_images(), torch.ones(4, 1, 2, 2))


def test_unsupported_layer_is_named() -> None:
    from timm.layers.evo_norm import EvoNorm2dS0a

    from spark_core.masking import MaskContext
    from spark_core.sparse import UnsupportedLayerError, sparsify_

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8))
    with pytest.raises(UnsupportedLayerError, match=r"layer '1' of type .*InstanceNorm2d"):
        sparsify_(net, MaskContext())
    with pytest.raises(UnsupportedLayerError, match="EvoNorm2dS0a"):
        sparsify_(nn.Sequential(EvoNorm2dS0a(8)), MaskContext())


def test_batch_norm_uses_fp32_statistics_under_bf16_autocast() -> None:
    model = small_spark("resnet18").train()
    images = make_images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert model.encoder.model.bn1.running_mean.dtype == torch.float32

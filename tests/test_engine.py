"""Training engine: recipe, exact resume, precisions, metrics, and a sync-free step."""

from __future__ import annotations

import io
import itertools
import logging
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spark_core import build_spark
from spark_core.data import (
    ImageFolderDataset,
    build_pretrain_transform,
    generate_synthetic_dataset,
)
from spark_core.engine import (
    PRECISIONS,
    EngineConfig,
    NonFiniteLossError,
    PretrainEngine,
    ProgressBar,
    lr_wd_at,
    param_groups,
    peak_lr,
)
from spark_core.gpu_input import INPUT_DECODERS, EncodedBatch
from spark_core.reference_impl import build_reference_spark
from spark_core.runtime import autocast_is_native

SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ImageFolderDataset:
    root = generate_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), num_images=32, image_size=SIZE, num_classes=2
    )
    return ImageFolderDataset(root, build_pretrain_transform(SIZE))


class Recorder:
    def __init__(self) -> None:
        self.steps: list = []
        self.epochs: list = []

    def on_step(self, metrics) -> None:
        self.steps.append(metrics)

    def on_epoch_end(self, engine, metrics) -> None:
        self.epochs.append(metrics)


def make_engine(callbacks=(), **overrides) -> PretrainEngine:
    torch.manual_seed(0)
    model = build_spark("resnet18", SIZE, decoder_width=64)
    config = EngineConfig(
        **{"epochs": 2, "batch_size": 8, "warmup_epochs": 1, "log_every": 3, **overrides}
    )
    return PretrainEngine(model, config, callbacks=callbacks)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_engine_warns_when_the_precision_has_no_fast_kernels_here(
    precision: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="spark_core.engine"):
        make_engine(precision=precision)
    slow = not autocast_is_native("cpu", PRECISIONS[precision])
    assert (f"no {precision} convolution kernels" in caplog.text) is slow
    if slow:
        assert "use precision='fp32'" in caplog.text


def test_schedule_follows_the_reference() -> None:
    peak = peak_lr(2e-4, 4096)
    assert peak == pytest.approx(3.2e-3)
    kwargs = {"total_steps": 100, "warmup_steps": 10, "peak": peak}
    wd_kwargs = {"weight_decay": 0.04, "weight_decay_end": 0.2}
    assert lr_wd_at(0, **kwargs, **wd_kwargs) == pytest.approx((0.005 * peak, 0.04))
    assert lr_wd_at(10, **kwargs, **wd_kwargs)[0] == pytest.approx(peak)
    assert lr_wd_at(99, **kwargs, **wd_kwargs) == pytest.approx((0.001 * peak, 0.2))
    lrs = [lr_wd_at(s, **kwargs, **wd_kwargs)[0] for s in range(100)]
    assert all(a <= b for a, b in itertools.pairwise(lrs[:11]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_param_groups_exclude_norms_biases_and_mask_tokens() -> None:
    model = build_spark("convnext_atto", SIZE, decoder_width=64)
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert any("mask_tokens" in n for n in no_decay_names)
    assert any(n.endswith(".gamma") for n in no_decay_names)
    assert all(not n.endswith(".bias") for n in decay_names)
    assert all(p.ndim > 1 for p in decay["params"])
    assert decay["weight_decay_scale"] == 1.0 and no_decay["weight_decay_scale"] == 0.0


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(
    dataset: ImageFolderDataset, tmp_path: Path
) -> None:
    straight = Recorder()
    make_engine([straight], epochs=3).fit(dataset)

    first = Recorder()
    engine = make_engine([first], epochs=3, checkpoint_dir=str(tmp_path))
    engine.train_one_epoch(engine.build_loader(dataset))  # then the process "dies"
    engine.save(tmp_path / "last.pt")
    second = Recorder()
    resumed = make_engine([second], epochs=3, checkpoint_dir=str(tmp_path))
    assert resumed.resume(tmp_path / "last.pt")
    assert resumed.epoch == 1 and resumed.global_step == 4
    resumed.fit(dataset)

    losses = [m.loss for m in straight.steps]
    assert len(losses) == 12
    assert [m.loss for m in first.steps + second.steps] == losses
    assert [m.step for m in second.steps] == list(range(4, 12))


def test_step_metrics_reach_callbacks(dataset: ImageFolderDataset) -> None:
    recorder = Recorder()
    stream = io.StringIO()
    progress = ProgressBar(
        total_epochs=2, steps_per_epoch=4, images_per_step=8, stream=stream, min_interval=0
    )
    make_engine([recorder, progress]).fit(dataset)
    assert [m.step for m in recorder.steps] == list(range(8))
    first = recorder.steps[0]
    assert first.lr > 0 and first.grad_norm > 0 and first.images_per_sec > 0
    assert math.isfinite(first.loss)
    assert [e.epoch for e in recorder.epochs] == [0, 1]
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 8 and "img/s" in lines[-1] and "ETA" in lines[-1]
    assert "step 8/8" in lines[-1]
    quiet = io.StringIO()
    throttled = ProgressBar(total_epochs=2, steps_per_epoch=4, images_per_step=8, stream=quiet)
    for metrics in recorder.steps:
        throttled.on_step(metrics)
    assert len(quiet.getvalue().strip().splitlines()) == 3  # first step, then each epoch end


def test_each_step_uses_the_scheduled_lr_and_weight_decay(dataset: ImageFolderDataset) -> None:
    recorder = Recorder()
    engine = make_engine([recorder], log_every=1, weight_decay=0.04, weight_decay_end=0.2)
    seen: list[list[tuple[float, float, float]]] = []
    optimizer_step = engine.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(
            [
                (g["lr"], g["weight_decay"], g["weight_decay_scale"])
                for g in engine.optimizer.param_groups
            ]
        )
        return optimizer_step(*args, **kwargs)

    engine.optimizer.step = recording_step
    engine.fit(dataset)  # 2 epochs of 4 steps, warm-up 1 epoch
    assert len(seen) == len(recorder.steps) == 8
    for step, (groups, metrics) in enumerate(zip(seen, recorder.steps, strict=True)):
        lr, wd = lr_wd_at(
            step, total_steps=8, warmup_steps=4, peak=engine.peak_lr, weight_decay=0.04,
            weight_decay_end=0.2,
        )  # fmt: skip
        assert (metrics.lr, metrics.weight_decay) == pytest.approx((lr, wd))
        assert {scale for *_, scale in groups} == {0.0, 1.0}
        for group_lr, group_wd, scale in groups:
            assert (group_lr, group_wd) == pytest.approx((lr, wd * scale))
    assert seen[3][0][0] > seen[0][0][0] and seen[7][0][1] > seen[0][0][1]


@pytest.mark.parametrize(
    ("precision", "dtype", "channels_last"),
    [
        ("bf16", torch.bfloat16, True),
        ("fp16", torch.float16, False),
        ("fp32", torch.float32, False),
    ],
)
def test_mixed_precision_and_channels_last(
    dataset: ImageFolderDataset, precision: str, dtype: torch.dtype, channels_last: bool
) -> None:
    engine = make_engine(precision=precision, channels_last=channels_last, epochs=1)
    decoder_outputs: list[torch.Tensor] = []
    conv = engine.model.decoder.dec[0].conv[0]
    conv.register_forward_hook(lambda m, args, out: decoder_outputs.append(out))
    history = engine.fit(dataset)
    assert math.isfinite(history[0].loss)
    assert {out.dtype for out in decoder_outputs} == {dtype}
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert all(out.is_contiguous(memory_format=layout) for out in decoder_outputs)
    assert conv.weight.is_contiguous(memory_format=layout) and conv.weight.dtype == torch.float32
    assert (engine.scaler is not None) == (precision == "fp16")


@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
@pytest.mark.parametrize("clip_grad", [1e-3, 0.0])
def test_the_step_clips_gradients_at_clip_grad(optimizer: str, clip_grad: float) -> None:
    engine = make_engine(optimizer=optimizer, clip_grad=clip_grad)
    _, grad_norm = engine.train_step(torch.randn(8, 3, SIZE, SIZE))
    # After one step each first moment is (1 - beta1) x the gradient the update used.
    beta1 = engine.optimizer.param_groups[0]["betas"][0]
    moments = [engine.optimizer.state[p]["exp_avg"] for p in engine._params]
    used = float(torch.nn.utils.get_total_norm(moments)) / (1 - beta1)
    assert float(grad_norm) > 1e-2
    assert used == pytest.approx(clip_grad if clip_grad else float(grad_norm), rel=1e-4)


@pytest.mark.parametrize("cudnn_benchmark", [True, False])
def test_the_step_runs_under_the_configured_cudnn_autotuning(cudnn_benchmark: bool) -> None:
    engine = make_engine(cudnn_benchmark=cudnn_benchmark)
    seen: list[bool] = []
    engine.model.register_forward_hook(lambda *_: seen.append(torch.backends.cudnn.benchmark))
    before = torch.backends.cudnn.benchmark
    engine.train_step(torch.randn(8, 3, SIZE, SIZE))
    assert seen == [cudnn_benchmark]
    assert torch.backends.cudnn.benchmark is before


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_compiled_optimizer_steps_like_the_eager_one(precision: str) -> None:
    """Compiled grad norm + compiled LAMB with clipping inside (and the fp16 GradScaler)
    against the eager engine: the model runs eagerly in both, so only the optimizer's
    rounding differs."""
    images = torch.randn(8, 3, SIZE, SIZE)
    runs = []
    for compile_optimizer in (False, True):
        engine = make_engine(
            precision=precision, compile_optimizer=compile_optimizer, clip_grad=1e-2
        )
        engine._set_schedule(10)
        norms = [float(engine.train_step(images)[1]) for _ in range(2)]
        runs.append((norms, [p.detach().clone() for p in engine.model.parameters()]))
    (eager_norms, eager_params), (compiled_norms, compiled_params) = runs
    assert compiled_norms == pytest.approx(eager_norms, rel=1e-4)
    assert max(eager_norms) > 1e-2  # clipping was active
    for a, b in zip(eager_params, compiled_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_model_compiles_to_one_graph(backbone: str) -> None:
    model = build_spark(backbone, SIZE, decoder_width=64).train()
    explanation = torch._dynamo.explain(model)(
        torch.randn(4, 3, SIZE, SIZE), model.generate_mask(4)
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_a_compiled_step_computes_what_the_eager_step_computes() -> None:
    """``EngineConfig(compile=True)`` end to end (forward, backward, LAMB) on a small model."""
    runs = []
    try:
        for compile_model in (False, True):
            torch.manual_seed(0)
            model = build_spark("resnet10t", SIZE, decoder_width=64, decoder_depth=1)
            engine = PretrainEngine(model, EngineConfig(batch_size=8, compile=compile_model))
            engine._set_schedule(10)
            g = torch.Generator().manual_seed(1)
            images = [torch.randn(8, 3, SIZE, SIZE, generator=g) for _ in range(2)]
            losses = [float(engine.train_step(batch)[0]) for batch in images]
            runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    finally:
        torch._dynamo.reset()
    (eager_losses, eager_params), (compiled_losses, compiled_params) = runs
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for a, b in zip(eager_params, compiled_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_non_finite_loss_is_reported(dataset: ImageFolderDataset) -> None:
    engine = make_engine()
    images = torch.full((8, 3, SIZE, SIZE), float("nan"))
    loss, _ = engine.train_step(images)
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        from spark_core.engine import _PendingStep, _Window

        window = _Window()
        window.pending.append(_PendingStep(0, 0, 0.1, 0.1, loss, loss, 1.0))
        engine._flush(window)


def test_dataset_smaller_than_a_batch_is_a_clear_error(dataset: ImageFolderDataset) -> None:
    engine = make_engine(batch_size=64)
    with pytest.raises(ValueError, match="batch_size=64"):
        engine.fit(dataset)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_gpu_decoder_trains_on_the_cpu_like_the_reference_pipeline(tmp_path: Path) -> None:
    """decoder="gpu" with the device augmentation on the CPU device: the loader yields encoded
    JPEGs, the engine decodes and augments each batch before its step. Every sample gets the
    crop and flip the reference pipeline gives it, so the losses are decoder="cpu"'s on the
    same files (up to the JPEG decoders' rounding)."""
    root = generate_synthetic_dataset(
        tmp_path / "jpg", num_images=16, image_size=SIZE, num_classes=2, image_format="jpg"
    )
    losses = {}
    for decoder in ("cpu", "gpu"):
        recorder = Recorder()
        engine = make_engine([recorder], epochs=1, log_every=1, decoder=decoder)
        dataset = INPUT_DECODERS[decoder].dataset(root, SIZE)
        if decoder == "gpu":
            assert isinstance(next(iter(engine.build_loader(dataset))), EncodedBatch)
        engine.fit(dataset)
        losses[decoder] = [step.loss for step in recorder.steps]
    assert len(losses["gpu"]) == 2 and all(math.isfinite(loss) for loss in losses["gpu"])
    assert losses["gpu"] == pytest.approx(losses["cpu"], rel=1e-3)


def test_bad_engine_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="decoder='nvjpeg': allowed values are cpu, gpu"):
        EngineConfig(decoder="nvjpeg")
    with pytest.raises(ValueError, match="precision"):
        EngineConfig(precision="fp8")
    with pytest.raises(ValueError, match="optimizer"):
        EngineConfig(optimizer="sgd9")
    with pytest.raises(ValueError, match="batch_size"):
        EngineConfig(batch_size=0)


class OpRecorder(TorchDispatchMode):
    """Records every aten op the step dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


HOST_SYNC_OPS = {"aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.item"}


@pytest.mark.parametrize(
    ("model_name", "precision"), [("resnet18", "fp32"), ("convnext_atto", "bf16")]
)
def test_training_step_calls_no_nonzero_and_reads_nothing_back(
    model_name: str, precision: str
) -> None:
    torch.manual_seed(0)
    model = build_spark(model_name, SIZE, decoder_width=64)
    config = EngineConfig(batch_size=8, precision=precision, channels_last=precision == "bf16")
    engine = PretrainEngine(model, config)
    images = torch.randn(8, 3, SIZE, SIZE)
    engine.train_step(images)  # warm-up: optimizer state creation
    with OpRecorder() as recorder:
        engine.train_step(images)
    assert len(recorder.ops) > 100
    assert not HOST_SYNC_OPS & set(recorder.ops)


def test_op_recorder_catches_the_reference_implementation() -> None:
    model = build_reference_spark("resnet18", SIZE, decoder_width=64).train()
    with OpRecorder() as recorder:
        model(torch.randn(2, 3, SIZE, SIZE)).loss.backward()
    assert "aten.nonzero" in recorder.ops


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_has_no_host_sync() -> None:
    engine = make_engine(device="cuda", precision="bf16", channels_last=True)
    images = torch.randn(8, 3, SIZE, SIZE, device="cuda")
    engine.train_step(images)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.train_step(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

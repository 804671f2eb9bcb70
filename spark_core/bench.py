"""Benchmark the SparK training step against the reference algorithm and a dense timm step.

Usage::

    python -m spark_core.bench                # CPU: resnet18, 96 px, batch 16, channels_last,
                                              # bf16 where the CPU has bf16 kernels, else fp32
    python -m spark_core.bench --device cuda  # resnet50, 224 px, batch 128, bf16, channels_last
    python -m spark_core.bench --no-compile --no-compile-optimizer   # eager mode

The SparK step is compiled by default (model with torch.compile; on CPU also the LAMB
update): the first steps then take a minute or two of compilation, outside the timing.

All variants run in one process, on the same data, interleaved over several rounds,
and the script prints img/s for each plus the ratios:

* ``spark``: this implementation (full step: forward, backward, LAMB);
* ``reference``: the reference code's algorithm (:mod:`spark_core.reference_impl`), fp32
  as the reference runs it (``--reference-precision`` to change);
* ``dense``: a plain timm classification step of the same backbone at the same precision.

``python -m spark_core.bench --data [--device cuda]`` measures the pre-training input
pipeline instead (JPEG decode + augmentation, DataLoader workers vs on the device): see
:mod:`spark_core.input_bench`.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from timm.optim import Lamb

from spark_core import input_bench
from spark_core.engine import PRECISIONS, EngineConfig, PretrainEngine, param_groups
from spark_core.model import build_spark
from spark_core.reference_impl import build_reference_spark
from spark_core.runtime import cudnn_autotuning, fastest_precision, keep_freed_memory_in_process

DEVICE_DEFAULTS = MappingProxyType(
    {
        "cpu": {
            "backbone": "resnet18",
            "input_size": 96,
            "batch_size": 16,
            # bf16 on a CPU without bf16 kernels (AVX2 only) is 10-15x slower than fp32.
            "precision": "auto",
            "compile": True,
            "compile_optimizer": True,
        },
        "cuda": {
            "backbone": "resnet50",
            "input_size": 224,
            "batch_size": 128,
            "precision": "bf16",
            "compile": True,
            "compile_optimizer": False,
        },
    }
)


@dataclass
class Result:
    name: str
    images_per_sec: float
    step_ms: float
    spread: float
    gflop_per_image: float
    tflops: float


def _spark_loss(args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    model = build_spark(args.backbone, args.input_size)
    return lambda images: model(images).loss


def _dense_loss(args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    import timm

    model = timm.create_model(args.backbone, num_classes=1000)
    return lambda images: F.cross_entropy(model(images), torch.zeros(len(images), dtype=torch.long))


def training_gflop_per_image(variant: str, args: argparse.Namespace) -> float:
    """Forward + backward GFLOP of one image (optimizer not counted), counted on the CPU.

    ``spark`` and ``reference`` compute the same convolutions; ``dense`` is the plain
    classifier. Dividing by the measured step time gives the achieved TFLOPS, the number
    that says how well a device runs each step.
    """
    from torch.utils.flop_counter import FlopCounterMode

    loss_of = _dense_loss(args) if variant == "dense" else _spark_loss(args)
    images = torch.randn(2, 3, args.input_size, args.input_size)  # 2: BN needs > 1 value
    with FlopCounterMode(display=False) as counter:
        loss_of(images).backward()
    return counter.get_total_flops() / len(images) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_rounds(
    steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, iters: int, rounds: int
) -> dict[str, list[float]]:
    """Interleave the variants round by round so drift (thermal, other load) hits all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - start) / iters)
    return times


def _spark_step(args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    model = build_spark(args.backbone, args.input_size)
    config = EngineConfig(
        batch_size=args.batch_size,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        compile_optimizer=args.compile_optimizer,
        device=str(device),
        cudnn_benchmark=args.cudnn_benchmark,
    )
    engine = PretrainEngine(model, config)
    engine._set_schedule(1000)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    return lambda: engine.train_step(images)


def _reference_step(args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    model = build_reference_spark(args.backbone, args.input_size).to(device).train()
    channels_last = args.reference_precision != "fp32" and args.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The reference's LAMB: per-parameter loop, clipping inside the optimizer at 5.0.
    groups = param_groups(model)
    for group in groups:
        group["weight_decay"] = 0.04 * group["weight_decay_scale"]
    optimizer = Lamb(groups, lr=1e-4, betas=(0.9, 0.95), max_grad_norm=5.0, foreach=False)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = PRECISIONS[args.reference_precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(images).loss
        optimizer.zero_grad()
        loss.backward()
        loss.item()  # the reference reads the loss every step
        optimizer.step()

    return step


def _dense_step(args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    import timm

    model = timm.create_model(args.backbone, num_classes=1000).to(device).train()
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    dtype = PRECISIONS[args.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


StepFactory = Callable[[argparse.Namespace, torch.device], Callable[[], None]]
VARIANTS: Mapping[str, StepFactory] = MappingProxyType(
    {
        "spark": _spark_step,
        "reference": _reference_step,
        "dense": _dense_step,
    }
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backbone")
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument(
        "--precision",
        choices=["auto", *PRECISIONS],
        help="spark's autocast dtype (default: cuda bf16; cpu auto = bf16 where the CPU has "
        "bf16 convolution kernels, else fp32)",
    )
    parser.add_argument("--reference-precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the SparK model (default: on; --no-compile for eager mode)",
    )
    parser.add_argument(
        "--compile-optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fuse LAMB's update with torch.compile (default: on for CPU, off for CUDA)",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let cuDNN pick the fastest conv algorithms, for every variant (default: on)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    parser.add_argument(
        "--no-malloc-tuning",
        dest="malloc_tuning",
        action="store_false",
        help="keep glibc's default of unmapping large freed blocks (see spark_core.runtime)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--profile", action="store_true", help="print the spark step's top ops (torch.profiler)"
    )
    input_bench.add_arguments(parser)
    args = parser.parse_args(argv)
    for key, value in (input_bench.DATA_DEFAULTS if args.data else {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.precision == "auto":
        args.precision = fastest_precision(args.device)
    return args


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    steps = {name: VARIANTS[name](args, device) for name in names}
    with cudnn_autotuning(args.cudnn_benchmark):
        times = _time_rounds(steps, device, args.warmup, args.iters, args.rounds)
    # spark and reference compute the same convolutions: count each model once.
    kind = {name: "dense" if name == "dense" else "spark" for name in times}
    gflop_of = {k: training_gflop_per_image(k, args) for k in set(kind.values())}
    results = {}
    for name, samples in times.items():
        best = statistics.median(samples)
        spread = (max(samples) - min(samples)) / best if best else 0.0
        images_per_sec = args.batch_size / best
        gflop = gflop_of[kind[name]]
        results[name] = Result(
            name, images_per_sec, best * 1000, spread, gflop, gflop * images_per_sec / 1000
        )
    return {
        "settings": {
            "device": _device_name(device),
            "backbone": args.backbone,
            "input_size": args.input_size,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "reference_precision": args.reference_precision,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "compile_optimizer": args.compile_optimizer,
            "cudnn_benchmark": args.cudnn_benchmark,
            "malloc_tuning": args.malloc_tuning,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "results": {k: vars(v) for k, v in results.items()},
        "ratios": _ratios(results),
    }


def _ratios(results: dict[str, Result]) -> dict[str, float]:
    ratios = {}
    if "spark" in results:
        for other in ("reference", "dense"):
            if other in results:
                ratios[f"spark/{other}"] = (
                    results["spark"].images_per_sec / results[other].images_per_sec
                )
    return ratios


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def profile(args: argparse.Namespace, rows: int = 30) -> str:
    """Top ops of the spark step by self time on the device (CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device(args.device)
    step = _spark_step(args, device)
    with cudnn_autotuning(args.cudnn_benchmark):
        for _ in range(args.warmup):
            step()
    _sync(device)
    activities = [ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort_by = "self_device_time_total"
    with torch_profile(activities=activities) as prof:
        for _ in range(args.iters):
            step()
        _sync(device)
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.malloc_tuning:
        keep_freed_memory_in_process()
    if args.data:
        # Progress goes to stderr; stdout keeps only the report.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        data = input_bench.run(args)
        print(json.dumps(data, indent=2) if args.json else input_bench.format_report(data))
        return 0
    if args.profile:
        print(profile(args))
        return 0
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    s = report["settings"]
    print(
        f"{s['device']} | {s['backbone']} {s['input_size']}px batch {s['batch_size']} | "
        f"spark {s['precision']}{' + channels_last' if s['channels_last'] else ''}"
        f"{' + compile' if s['compile'] else ''}"
        f"{' + compiled LAMB' if s['compile_optimizer'] else ''} | "
        f"reference {s['reference_precision']} | "
        f"torch {s['torch']}"
    )
    for r in report["results"].values():
        print(
            f"  {r['name']:<10} {r['images_per_sec']:9.1f} img/s  {r['step_ms']:8.1f} ms/step  "
            f"(spread {100 * r['spread']:2.0f}%)  {r['gflop_per_image']:6.1f} GFLOP/img  "
            f"{r['tflops']:7.2f} TFLOPS"
        )
    for name, ratio in report["ratios"].items():
        print(f"  {name:<16} {ratio:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

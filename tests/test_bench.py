"""The benchmark runs end to end and reports every variant and ratio (numbers not asserted)."""

from __future__ import annotations

import json

import pytest

from spark_core import bench
from spark_core.runtime import fastest_precision


def test_bench_reports_all_variants_and_ratios(capsys) -> None:
    args = [
        "--input-size", "64", "--batch-size", "2", "--warmup", "1", "--iters", "1",
        "--rounds", "1", "--no-compile", "--no-compile-optimizer", "--json",
    ]  # fmt: skip
    assert bench.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"spark", "reference", "dense"}
    assert set(report["ratios"]) == {"spark/reference", "spark/dense"}
    assert all(r["images_per_sec"] > 0 for r in report["results"].values())
    flops = {name: r["gflop_per_image"] for name, r in report["results"].items()}
    assert flops["spark"] == flops["reference"] > 3 * flops["dense"] > 0  # the decoder
    spark = report["results"]["spark"]
    achieved = spark["gflop_per_image"] * spark["images_per_sec"] / 1e3
    assert spark["tflops"] == pytest.approx(achieved)
    assert report["settings"]["backbone"] == "resnet18"
    assert report["settings"]["cudnn_benchmark"] is True


def test_bench_settings_follow_the_flags() -> None:
    args = bench.parse_args(["--device", "cuda", "--no-cudnn-benchmark", "--compile-optimizer"])
    assert (args.backbone, args.input_size, args.batch_size) == ("resnet50", 224, 128)
    assert args.cudnn_benchmark is False and args.compile_optimizer is True


@pytest.mark.parametrize(
    ("device", "expected"),
    [  # the settings of the targets (and of the README's table)
        ("cpu", ("resnet18", 96, 16, fastest_precision("cpu"), True, True, True, "fp32")),
        ("cuda", ("resnet50", 224, 128, "bf16", True, True, False, "fp32")),
    ],
)
def test_bench_defaults_are_the_targets_settings(device: str, expected: tuple) -> None:
    args = bench.parse_args(["--device", device])
    settings = (
        args.backbone,
        args.input_size,
        args.batch_size,
        args.precision,
        args.channels_last,
        args.compile,
        args.compile_optimizer,
        args.reference_precision,
    )
    assert settings == expected
    assert args.variants.split(",") == ["spark", "reference", "dense"]


def test_bench_profile_lists_convolutions() -> None:
    args = bench.parse_args(
        ["--input-size", "64", "--batch-size", "2", "--warmup", "1", "--iters", "1",
         "--no-compile", "--no-compile-optimizer"]
    )  # fmt: skip
    assert "convolution" in bench.profile(args, rows=40)

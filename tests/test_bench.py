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
    [  # the settings of the issue's targets (and of the README's table)
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


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_input_benchmark_runs_both_paths_at_a_tiny_size(capsys) -> None:
    """``--data`` on the CPU: every DataLoader worker count, the device path (run on the CPU
    and labelled so), the device-only ceiling; the files' mean size is reported."""
    args = [
        "--data", "--data-images", "16", "--data-width", "64", "--data-height", "48",
        "--input-size", "32", "--batch-size", "4", "--data-batches", "2",
        "--data-workers", "0,1", "--device-workers", "0", "--json",
    ]  # fmt: skip
    assert bench.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    settings = report["settings"]
    assert (settings["width"], settings["height"], settings["images"]) == (64, 48, 16)
    assert (settings["input_size"], settings["batch_size"]) == (32, 4)
    assert 0.5 < settings["mean_file_kb"] < 20
    assert "not a GPU measurement" in settings["note"]
    assert list(report["results"]) == ["dataloader/w0", "dataloader/w1", "device/w0", "device-only"]
    for row in report["results"].values():
        assert row["images_per_sec"] > 0 and row["images"] == 8
        assert row["device"] == "cpu"


def test_input_benchmark_defaults_are_the_issues_setting() -> None:
    args = bench.parse_args(["--data", "--device", "cuda"])
    assert (args.input_size, args.batch_size) == (224, 128)
    assert (args.data_width, args.data_height, args.data_quality) == (500, 375, 90)
    assert args.data_workers == "0,2,4,8,16"
    # Without --data the step benchmark keeps its own defaults.
    assert bench.parse_args(["--device", "cpu"]).batch_size == 16


def test_input_benchmark_table_lists_every_row() -> None:
    from spark_core.input_bench import format_report

    row = {"path": "device", "device": "cuda", "workers": 4, "images_per_sec": 2600.0,
           "batch_ms": 49.2}  # fmt: skip
    settings = {
        "device": "H200", "images": 512, "width": 500, "height": 375, "quality": 90,
        "mean_file_kb": 110.4, "input_size": 224, "batch_size": 128, "cpus": 16,
        "torch": "2.14.1", "torchvision": "0.29.1", "note": "",
    }  # fmt: skip
    table = format_report({"settings": settings, "results": {"device/w4": row}})
    assert "mean 110.4 KB" in table and "500x375" in table
    assert "device" in table.splitlines()[-1] and "2600.0" in table.splitlines()[-1]

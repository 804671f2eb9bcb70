"""Tests for ``sparkctl`` (orchestrator.cli.main), run in-process; no Ray is started.

Settings come from a monkeypatched environment: SPARKORCH_HOME and the data roots lie under
tmp_path, and the working directory is tmp_path, so nothing is written in the repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import EXIT_BAD_INPUT, main

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "examples" / "pretrain-smoke.yaml"
IMAGENET = REPO / "examples" / "pretrain-imagenet-resnet50.yaml"
SETTINGS_ENV = (
    "SPARKORCH_HOME",
    "SPARKORCH_DATA_ROOTS",
    "SPARKORCH_MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_URI",
    "SPARKORCH_MLFLOW_EXPERIMENT",
    "SPARKORCH_MLFLOW_UI_URL",
    "SPARKORCH_RAY_ADDRESS",
    "RAY_ADDRESS",
    "SPARKORCH_RAY_STORAGE",
    "SPARKORCH_RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_TOKEN_PATH",
    "SPARKORCH_RAY_NUM_CPUS",
)


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.home = tmp_path / "home"
        self.data = tmp_path / "data"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    paths = Env(tmp_path)
    paths.data.mkdir()
    monkeypatch.setenv("SPARKORCH_HOME", str(paths.home))
    monkeypatch.setenv("SPARKORCH_DATA_ROOTS", json.dumps([str(paths.data)]))
    monkeypatch.chdir(tmp_path)
    return paths


def write_spec(folder: Path, document: Any, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(document))
    return path


BAD_SPEC = {
    "name": "bad name",
    "data": {"train": {"kind": "synthetic"}},
    "optim": {"global_batch_size": 32},
    "spark": {"hierarchy": 9},
}


# ------------------------------------------------------------------------------ validate


def test_validate_good_spec(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(SMOKE)]) == 0
    out, err = capsys.readouterr()
    assert out == (f"{SMOKE}: valid (resnet18, 6 epochs, 2 worker(s) x batch 16, peak lr 0.0125)\n")
    assert err == ""
    assert not env.home.exists()  # validating writes nothing


def test_validate_json(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--json", str(SMOKE)]) == 0
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["valid"] is True
    assert document["derived"] == {"peak_lr": 0.0125, "per_worker_batch": 16, "use_gpu": False}
    assert document["spec"]["name"] == "pretrain-smoke"
    assert document["spec"]["data"]["train"]["kind"] == "synthetic"
    assert err == ""


def test_validate_uses_the_data_roots_of_the_environment(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    for split in ("train", "val"):
        (env.data / "imagenet" / split).mkdir(parents=True)
    assert main(["validate", "--json", str(IMAGENET)]) == 0
    document = json.loads(capsys.readouterr().out)
    data = document["spec"]["data"]
    assert data["train"]["path"] == str((env.data / "imagenet" / "train").resolve())
    assert data["eval"]["path"] == str((env.data / "imagenet" / "val").resolve())
    assert document["derived"]["per_worker_batch"] == 128
    assert document["derived"]["use_gpu"] is True


def test_validate_data_folder_missing(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(IMAGENET)]) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{IMAGENET} is invalid:" in err
    assert "  data.train.path: 'imagenet/train' is not an existing folder" in err
    assert "  data.eval.path: 'imagenet/val' is not an existing folder" in err


def test_validate_bad_spec_text(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_spec(env.tmp, BAD_SPEC)
    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{path} is invalid:\n")
    assert "\n  name: " in err
    assert "\n  spark.hierarchy: Input should be less than or equal to 4" in err


def test_validate_bad_spec_json(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_spec(env.tmp, BAD_SPEC, "spec.json")
    assert main(["validate", "--json", str(path)]) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["valid"] is False
    fields = {error["field"]: error["message"] for error in document["errors"]}
    assert set(fields) == {"name", "spark.hierarchy"}
    assert fields["spark.hierarchy"] == "Input should be less than or equal to 4"
    assert err == ""


def test_validate_cross_field_error(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_spec(
        env.tmp,
        {
            "data": {"train": {"kind": "synthetic"}},
            "optim": {"global_batch_size": 30},
            "resources": {"num_workers": 4},
        },
    )
    assert main(["validate", "--json", str(path)]) == EXIT_BAD_INPUT
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert [error["field"] for error in errors] == ["optim.global_batch_size"]
    assert "divisible by resources.num_workers=4" in errors[0]["message"]


@pytest.mark.parametrize("as_json", [False, True])
def test_validate_missing_file(env: Env, capsys: pytest.CaptureFixture[str], as_json: bool) -> None:
    path = env.tmp / "nope.yaml"
    argv = ["validate", *(["--json"] if as_json else []), str(path)]
    assert main(argv) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    message = f"cannot read {path}: No such file or directory"
    if as_json:
        assert json.loads(out) == {"valid": False, "errors": [{"field": "", "message": message}]}
        assert err == ""
    else:
        assert out == ""
        assert message in err


def test_validate_a_folder(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(env.data)]) == EXIT_BAD_INPUT
    assert "cannot read" in capsys.readouterr().err


def test_bad_setting_is_reported(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARKORCH_RAY_NUM_CPUS", "0")
    assert main(["validate", str(SMOKE)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "SPARKORCH_RAY_NUM_CPUS" in err
    assert "greater than or equal to 1" in err


def test_data_roots_accept_a_path_list(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARKORCH_DATA_ROOTS", f"{env.data}:{env.data}")
    assert main(["validate", str(SMOKE)]) == 0
    assert "valid" in capsys.readouterr().out


def test_no_command_is_a_usage_error(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: sparkctl" in capsys.readouterr().err


# -------------------------------------------------------------------------------- schema


def test_schema(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "PretrainSpec"
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert {"name", "model", "spark", "data", "optim", "resources"} <= set(schema["properties"])
    spark = schema["$defs"]["SparkSpec"]["properties"]
    assert spark["mask_ratio"]["exclusiveMaximum"] == 1.0
    assert spark["decoder_width"]["multipleOf"] == 32


# -------------------------------------------------------------------------------- export


@pytest.mark.slow  # importing MLflow and creating its SQLite store take a few seconds
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")
def test_export_unknown_run(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    run_id = "0123456789abcdef0123456789abcdef"
    out_file = env.tmp / "encoder.safetensors"
    assert main(["export", run_id, str(out_file)]) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert out == ""
    assert f"error: run '{run_id}': Run with id={run_id} not found" in err
    assert not out_file.exists()
    # The store that was asked is the embedded one under SPARKORCH_HOME.
    assert (env.home / "mlflow.db").is_file()
    assert not (env.tmp / "mlruns").exists()

    assert main(["export", "--json", "deadbeef", str(out_file)]) == EXIT_BAD_INPUT
    document = json.loads(capsys.readouterr().out)
    assert document["errors"] == [
        {"field": "", "message": "run 'deadbeef': Run with id=deadbeef not found"}
    ]

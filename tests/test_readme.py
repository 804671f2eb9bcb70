"""The README's library examples run as written (the training one scaled down)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spark_core.data import generate_synthetic_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


def _library_examples() -> list[str]:
    section = README.read_text().split("## The library: `spark_core`", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_library_section_has_both_examples() -> None:
    first, training = _library_examples()
    assert "build_spark(" in first and "export_encoder(" in first
    assert "PretrainEngine(" in training and "engine.fit(" in training


@pytest.mark.slow
def test_the_api_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # it writes encoder.safetensors to the working directory
    namespace: dict = {}
    exec(compile(_library_examples()[0], "README.md", "exec"), namespace)
    assert (tmp_path / "encoder.safetensors").exists()
    assert tuple(namespace["out"].pred.shape) == (8, 3, 224, 224)
    assert int(namespace["active"].sum()) == 8 * 20
    assert len(namespace["features"]) == 4


def test_the_training_example_runs_scaled_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same code; only the data folder, sizes, epochs and device are made test-sized."""
    monkeypatch.chdir(tmp_path)
    generate_synthetic_dataset(tmp_path / "images", num_images=8, image_size=64)
    code = _library_examples()[1]
    replacements = {
        '"/data/images"': repr(str(tmp_path / "images")),
        "224": "64",
        "1600": "1",
        "128": "4",
        'device="cuda"': 'device="cpu"',
        "convnext_tiny": "convnext_atto",
    }
    for old, new in replacements.items():
        assert old in code, f"the README's training example no longer contains {old}"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    engine = namespace["engine"]
    assert engine.epoch == 1 and engine.global_step == 2
    assert (tmp_path / "runs" / "cnx-t" / "last.pt").exists()

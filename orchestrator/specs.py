"""What a pre-training job computes: :class:`PretrainSpec`, validated once, used everywhere.

The same object is what ``sparkctl`` reads from YAML/JSON, what the job entrypoint receives,
what each Ray Train worker rebuilds the run from, and what the REST API accepts. Every part
forbids unknown keys, numbers are bounded, strings are allow-listed and data paths must lie
under the configured data roots (``SPARKORCH_DATA_ROOTS``; pass them as validation context
``{"data_roots": [...]}``). Errors name the field path (``optim.base_lr``).

Derived values (peak lr, per-worker batch) are computed in one place:
:meth:`PretrainSpec.derived`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from orchestrator import backbone_catalog

if TYPE_CHECKING:
    from spark_core.engine import EngineConfig

MAX_SPEC_BYTES = 256 * 1024

# Facts of spark_core that validation needs, declared here so that validating a spec imports
# neither torch nor timm (the REST service never does); tests/test_layering.py fails when they
# differ from spark_core's (PATCH_STRIDE, MAX_HIERARCHY, MAX_DECODER_DEPTH, DENSIFY_NORMS,
# SparKConfig's defaults, masking.num_visible).
PATCH_STRIDE = 32
MAX_HIERARCHY = 4
MAX_DECODER_DEPTH = 8
DENSIFY_NORMS = ("auto", "bn", "ln", "identity")
DECODERS = ("cpu", "gpu")  # spark_core.gpu_input.INPUT_DECODERS

# MLflow tags the service writes itself; a spec's own tags may not use them.
JOB_ID_TAG = "job_id"
SERVICE_TAG_PREFIX = "sparkorch."
RESERVED_TAG_PREFIXES = ("mlflow.", SERVICE_TAG_PREFIX)


def _charset(pattern: str, rule: str):
    """A string validator that explains ``rule`` instead of showing the regex."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise PydanticCustomError("string_charset", "{rule}", {"rule": rule})
        return value

    return AfterValidator(check)


NAME_MAX_LENGTH = 64
NAME_RULE = (
    f"use 1-{NAME_MAX_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit"
)
Name = Annotated[
    str,
    _charset(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX_LENGTH - 1}}}", NAME_RULE),
    Field(description=NAME_RULE),
]


def is_reserved_tag(key: str) -> bool:
    """A tag key the service writes itself (the job id, MLflow's and its own)."""
    return key == JOB_ID_TAG or key.startswith(RESERVED_TAG_PREFIXES)


def _not_reserved(key: str) -> str:
    if is_reserved_tag(key):
        reserved = ", ".join(f"{prefix}*" for prefix in RESERVED_TAG_PREFIXES)
        raise PydanticCustomError(
            "reserved_tag",
            "tag key {key!r} is reserved for the service's own run tags ({job_id}, {reserved}); "
            "choose another key",
            {"key": key, "job_id": JOB_ID_TAG, "reserved": reserved},
        )
    return key


TagKey = Annotated[
    str,
    _charset(
        r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}",
        "tag keys: 1-64 letters, digits, '.', '_', '/' or '-', starting with a letter or digit",
    ),
    AfterValidator(_not_reserved),
]
TagValue = Annotated[
    str,
    _charset(
        r"[A-Za-z0-9 ._:/@+=,()-]{0,256}",
        "tag values: at most 256 letters, digits, spaces and . _ : / @ + = , ( ) -",
    ),
]


class SpecError(ValueError):
    """A spec failed validation; :attr:`errors` holds ``(field path, message)`` pairs."""

    def __init__(self, errors: Sequence[tuple[str, str]], source: str = "spec") -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  {path or '(root)'}: {message}" for path, message in self.errors)
        super().__init__(f"{source} is invalid:\n{lines}")

    @classmethod
    def from_validation_error(cls, error: ValidationError, source: str = "spec") -> SpecError:
        return cls([(field_path(e["loc"]), _message(e["msg"])) for e in error.errors()], source)


def field_path(loc: Sequence[int | str]) -> str:
    """``("data", "train", "image_folder", "path")`` -> ``"data.train.path"``."""
    parts = [str(part) for part in loc]
    # Drop the union tag pydantic inserts after a data source (data.train / data.eval).
    kept = [
        part
        for i, part in enumerate(parts)
        if not (
            part in DATA_KINDS
            and i >= 2
            and parts[i - 1] in ("train", "eval")
            and parts[i - 2] == "data"
        )
    ]
    return ".".join(kept)


def _message(msg: str) -> str:
    return msg.removeprefix("Value error, ")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _raise_conflicts(title: str, kind: str, errors: Sequence[tuple[tuple, Any, str]]) -> None:
    """Raise the ``(location, value, message)`` cross-field errors at their field paths."""
    if errors:
        raise ValidationError.from_exception_data(
            title,
            [
                InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)
                for loc, value, message in errors
            ],
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SpecT = TypeVar("SpecT", bound=_Strict)


# ------------------------------------------------------------------------------- model


def check_backbone(backbone: str) -> str:
    """``backbone`` when it is a timm name of a family spark_core supports (pretrained tags
    allowed), else ValueError listing the families (what ``spark_core.resolve_family`` says,
    answered from the generated :mod:`orchestrator.backbone_catalog`)."""
    prefixes = tuple(p for group in backbone_catalog.FAMILY_PREFIXES.values() for p in group)
    if not backbone.startswith(prefixes) or backbone not in backbone_catalog.NAMES:
        reason = (
            "is not a timm model name"
            if backbone.startswith(prefixes)
            else "is not a supported backbone"
        )
        raise ValueError(
            f"backbone={backbone!r} {reason}. Supported families: "
            f"{backbone_catalog.FAMILIES_TEXT}. See timm.list_models('resnet*') / "
            "timm.list_models('convnext*') for exact names."
        )
    return backbone


Backbone = Annotated[
    str, Field(max_length=64, pattern=r"^[a-z0-9_.]+$"), AfterValidator(check_backbone)
]
InputSize = Annotated[int, Field(ge=32, le=1024, multiple_of=PATCH_STRIDE)]


class ModelSpec(_Strict):
    """The backbone and input resolution (timm names; see spark_core.BACKBONE_FAMILIES)."""

    backbone: Backbone = "resnet50"
    input_size: InputSize = 224
    drop_path_rate: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="stochastic depth; default (null): the reference recipe's value for the "
        "backbone (ResNet-50 0.05, -101 0.08, -152 0.10, -200 0.15, ConvNeXt-S/B/L "
        "0.2/0.3/0.4, otherwise 0)",
    )

    def effective_drop_path_rate(self) -> float:
        """``drop_path_rate``, or the reference recipe's value for the backbone."""
        if self.drop_path_rate is not None:
            return self.drop_path_rate
        from spark_core.pretrain_recipe import reference_drop_path  # no torch, no timm

        return reference_drop_path(self.backbone)


class SparkSpec(_Strict):
    """Every ablation switch of :func:`spark_core.build_spark` (defaults = the reference)."""

    mask_ratio: float = Field(default=0.6, gt=0.0, lt=1.0)
    sparse: bool = True
    hierarchy: int = Field(default=4, ge=1, le=MAX_HIERARCHY)
    mask_token: bool = True
    densify_norm: Literal[DENSIFY_NORMS] = "auto"  # type: ignore[valid-type]
    decoder_width: int = Field(default=768, ge=PATCH_STRIDE, le=4096, multiple_of=PATCH_STRIDE)
    decoder_depth: int = Field(default=2, ge=1, le=MAX_DECODER_DEPTH)
    norm_pix_loss: bool = True


# -------------------------------------------------------------------------------- data


def _data_roots(info: ValidationInfo) -> tuple[Path, ...]:
    context = info.context or {}
    roots = context.get("data_roots")
    if roots is None:
        from orchestrator.settings import OrchestratorSettings

        roots = OrchestratorSettings().allowed_data_roots
    return tuple(Path(root).expanduser().resolve() for root in roots)


def resolve_data_path(value: str, roots: Sequence[Path], *, file: bool = False) -> Path:
    """The folder (or, with ``file``, the file) ``value`` names, refused unless it lies under
    one of ``roots``.

    Relative paths are taken from the first root. Symbolic links are followed before the
    check, so a link pointing out of the roots is refused.
    """
    roots_text = ", ".join(str(r) for r in roots) or "(none configured)"
    if "://" in value or value.startswith("file:"):
        raise ValueError(
            "URLs are not accepted; give a folder path under one of the data roots: " + roots_text
        )
    if any(part == ".." for part in Path(value).parts):
        raise ValueError("'..' is not allowed in data paths")
    path = Path(value).expanduser()
    if not path.is_absolute():
        if not roots:
            raise ValueError("no data roots are configured (set SPARKORCH_DATA_ROOTS)")
        path = roots[0] / path
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ValueError(
            f"{value!r} lies outside the allowed data roots ({roots_text}); move the data "
            "under one of them or add a root with SPARKORCH_DATA_ROOTS"
        )
    if file and not resolved.is_file():
        raise ValueError(f"{value!r} is not an existing file (looked for {resolved})")
    if not file and not resolved.is_dir():
        raise ValueError(f"{value!r} is not an existing folder (looked for {resolved})")
    return resolved


class ImageFolderData(_Strict):
    """Images in a folder (class sub-folders, or flat when unlabelled)."""

    kind: Literal["image_folder"] = "image_folder"
    path: str = Field(min_length=1, max_length=1024)

    @field_validator("path")
    @classmethod
    def _inside_roots(cls, value: str, info: ValidationInfo) -> str:
        return str(resolve_data_path(value, _data_roots(info)))


class SyntheticData(_Strict):
    """Procedurally generated labelled images (see spark_core.data.generate_synthetic_dataset)."""

    kind: Literal["synthetic"] = "synthetic"
    count: int = Field(default=256, ge=8, le=200_000)
    size: int = Field(default=64, ge=16, le=1024)
    classes: int = Field(default=4, ge=1, le=24)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    style: Literal["shapes", "textures"] = "textures"


DataSource = Annotated[ImageFolderData | SyntheticData, Field(discriminator="kind")]
DATA_KINDS = frozenset({"image_folder", "synthetic"})


def _default_kind(value: Any) -> Any:
    """A source without ``kind`` is a folder when it has a ``path``, else synthetic."""
    if isinstance(value, Mapping) and "kind" not in value:
        return {"kind": "image_folder" if "path" in value else "synthetic", **value}
    return value


class DataSpec(_Strict):
    """Pre-training images, and optionally a separate labelled set for evaluation.

    Without ``eval``, evaluation uses a stratified ``evaluation.val_fraction`` split of
    ``train`` (which must then be labelled) and, with ``holdout``, pre-training does not see
    the held-out images.
    """

    train: DataSource
    eval: DataSource | None = None
    holdout: bool = True
    loader_workers: int = Field(default=0, ge=0, le=32)
    decoder: Literal[DECODERS] = Field(  # type: ignore[valid-type]
        default="cpu",
        description="where pre-training images are decoded and augmented: cpu (PIL in the "
        "loader workers, the reference) or gpu (JPEG only: the workers read the files, each "
        "worker's GPU decodes and augments them; needs resources.gpus_per_worker > 0; "
        "synthetic data is then generated as JPEG)",
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> Any:
        return _default_kind(value)


# ------------------------------------------------------------------------ optimisation


class OptimSpec(_Strict):
    """The training recipe (defaults = the reference's ImageNet recipe)."""

    optimizer: Literal["lamb", "adamw"] = "lamb"
    base_lr: float = Field(default=2e-4, gt=0.0, le=1.0)
    global_batch_size: int = Field(default=4096, ge=1, le=65_536)
    epochs: int = Field(default=1600, ge=0, le=10_000)
    warmup_epochs: float = Field(default=40.0, ge=0.0, le=10_000)
    weight_decay: float = Field(default=0.04, ge=0.0, le=1.0)
    weight_decay_end: float = Field(default=0.2, ge=0.0, le=1.0)
    clip_grad: float = Field(default=5.0, ge=0.0, le=1000.0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    # LAMB's update through torch.compile: a minute of compiling, then ~4x faster on CPU.
    compile_optimizer: bool = False
    log_every: int = Field(default=10, ge=1, le=10_000)


class ResourcesSpec(_Strict):
    """Ray Train workers (one DDP rank each) and what each one reserves."""

    num_workers: int = Field(default=1, ge=1, le=512)
    cpus_per_worker: float = Field(default=1.0, gt=0.0, le=256)
    gpus_per_worker: float = Field(default=0.0, ge=0.0, le=16)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class CheckpointSpec(_Strict):
    every_epochs: int = Field(default=1, ge=1, le=10_000)
    keep: int = Field(default=2, ge=1, le=100)


class FailureSpec(_Strict):
    max_failures: int = Field(
        default=0, ge=0, le=100, description="worker failures Ray Train recovers from"
    )
    resubmit_on_loss: bool = Field(
        default=True,
        description="when the cluster loses the job (restarted), the service submits it "
        "again; it resumes from its checkpoints and MLflow run",
    )


class EvaluationSpec(_Strict):
    """A quick look at the final encoder on frozen features (the paper's protocol is the
    ``finetune`` job kind, and a sweep's ``finetune`` section)."""

    method: Literal["none", "linear_probe", "knn"] = "linear_probe"
    val_fraction: float = Field(default=0.25, ge=0.05, le=0.5)
    batch_size: int = Field(default=64, ge=1, le=1024)


class TrackingSpec(_Strict):
    """What goes to MLflow besides metrics."""

    experiment: Name | None = None
    reconstruction_every: int = Field(
        default=1, ge=0, le=10_000, description="epochs between reconstruction pictures; 0 = never"
    )
    reconstruction_images: int = Field(default=8, ge=1, le=32)
    register_model: bool = False


def num_visible(grid: tuple[int, int], mask_ratio: float) -> int:
    """Visible patches per sample: ``round(h * w * (1 - mask_ratio))`` (spark_core's rule)."""
    h, w = grid
    return round(h * w * (1.0 - mask_ratio))


def mask_ratio_problem(grid: tuple[int, int], mask_ratio: float) -> str:
    """Why ``mask_ratio`` leaves no patch visible or none masked on a patch grid ('' if
    neither); the same text as ``spark_core.masking.mask_ratio_problem``."""
    h, w = grid
    visible = num_visible(grid, mask_ratio)
    patches = f"{h * w} patches" if h * w > 1 else "1 patch"
    count = f"round({h}*{w} * (1 - {mask_ratio})) = {visible} of {patches} stay visible"
    if visible < 1:
        return f"{count}, so the encoder sees nothing; lower mask_ratio or raise input_size"
    if visible >= h * w:
        return (
            f"{count}, so nothing is masked and the loss is always 0; raise mask_ratio or "
            "input_size"
        )
    return ""


@dataclass(frozen=True)
class DerivedValues:
    """Values computed from a spec (never stored in it)."""

    peak_lr: float
    per_worker_batch: int
    use_gpu: bool


class PretrainSpec(_Strict):
    """One SparK pre-training job."""

    name: Name = "spark-pretrain"
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=32)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    spark: SparkSpec = Field(default_factory=SparkSpec)
    data: DataSpec
    optim: OptimSpec = Field(default_factory=OptimSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failures: FailureSpec = Field(default_factory=FailureSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _consistent(self) -> PretrainSpec:
        errors = list(self._cross_field_errors())
        _raise_conflicts(type(self).__name__, "spec_conflict", errors)
        return self

    def _cross_field_errors(self):
        grid = self.model.input_size // PATCH_STRIDE
        problem = mask_ratio_problem((grid, grid), self.spark.mask_ratio)
        if problem:
            yield (
                ("spark", "mask_ratio"),
                self.spark.mask_ratio,
                f"at model.input_size={self.model.input_size}: {problem}",
            )
        if self.data.decoder == "gpu" and self.resources.gpus_per_worker <= 0:
            yield (
                ("data", "decoder"),
                self.data.decoder,
                "gpu decodes and augments the images on each worker's GPU, but "
                "resources.gpus_per_worker is 0; give the workers a GPU "
                "(resources.gpus_per_worker: 1) or use data.decoder: cpu",
            )
        workers = self.resources.num_workers
        batch = self.optim.global_batch_size
        if batch % workers:
            yield (
                ("optim", "global_batch_size"),
                batch,
                f"must be divisible by resources.num_workers={workers} (each worker takes an "
                "equal share)",
            )
            return
        train = self.data.train
        if isinstance(train, SyntheticData):
            held_out = self.evaluation.method != "none" and self.data.eval is None
            usable = train.count
            if held_out and self.data.holdout:
                usable = int(train.count * (1 - self.evaluation.val_fraction))
            if usable // workers < batch // workers:
                yield (
                    ("data", "train", "count"),
                    train.count,
                    f"gives {usable // workers} pre-training images per worker, fewer than "
                    f"the per-worker batch {batch // workers}; raise the count or lower "
                    "optim.global_batch_size",
                )
            if held_out and train.classes < 2:
                yield (
                    ("data", "train", "classes"),
                    train.classes,
                    "evaluation needs at least 2 classes (or set evaluation.method: none)",
                )

    def derived(self) -> DerivedValues:
        """Peak lr, per-worker batch and device (imports spark_core: not for the REST
        service)."""
        from spark_core.engine import peak_lr

        return DerivedValues(
            peak_lr=peak_lr(self.optim.base_lr, self.optim.global_batch_size),
            per_worker_batch=self.optim.global_batch_size // self.resources.num_workers,
            use_gpu=self.resources.gpus_per_worker > 0,
        )

    def build_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`spark_core.build_spark` for this spec."""
        return {
            "backbone": self.model.backbone,
            "input_size": self.model.input_size,
            "drop_path_rate": self.model.effective_drop_path_rate(),
            **self.spark.model_dump(),
        }

    def engine_config(self, *, device: str, checkpoint_dir: str | None = None) -> EngineConfig:
        """The engine settings of one worker."""
        from spark_core.engine import EngineConfig

        optim = self.optim
        return EngineConfig(
            epochs=optim.epochs,
            batch_size=self.derived().per_worker_batch,
            global_batch_size=optim.global_batch_size,
            optimizer=optim.optimizer,
            base_lr=optim.base_lr,
            warmup_epochs=optim.warmup_epochs,
            weight_decay=optim.weight_decay,
            weight_decay_end=optim.weight_decay_end,
            clip_grad=optim.clip_grad,
            precision=optim.precision,
            channels_last=optim.channels_last,
            compile=optim.compile,
            compile_optimizer=optim.compile_optimizer,
            seed=self.seed,
            log_every=optim.log_every,
            loader_workers=self.data.loader_workers,
            decoder=self.data.decoder,
            device=device,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=self.checkpoint.every_epochs,
        )

    def flat_params(self) -> dict[str, str]:
        """The spec as flat ``section.field`` -> text pairs (MLflow params), tags excluded;
        an omitted drop path as the value it stands for."""
        flat = flatten(self.model_dump(mode="json", exclude={"tags"}))
        flat["model.drop_path_rate"] = str(self.model.effective_drop_path_rate())
        return flat


# ---------------------------------------------------------------------------- fine-tuning

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt")
FINETUNE_NAME_SUFFIX = "-finetune"


class PretrainJobWeights(_Strict):
    """The encoder a pre-training job of this service exported (found by its job id)."""

    kind: Literal["pretrain_job"] = "pretrain_job"
    job_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class MlflowRunWeights(_Strict):
    """The encoder artifact of an MLflow run (a pre-training run of this service)."""

    kind: Literal["mlflow_run"] = "mlflow_run"
    run_id: str = Field(pattern=r"^[0-9a-f]{32}$")


class FileWeights(_Strict):
    """A ``.safetensors`` / ``.pth`` file under the data roots: an exported encoder, a timm
    state dict, or the authors' released checkpoints (``*_1kpretrained_timm_style.pth``,
    ConvNeXt ``*_official_style.pth``). Read without unpickling objects."""

    kind: Literal["file"] = "file"
    path: str = Field(min_length=1, max_length=1024)

    @field_validator("path")
    @classmethod
    def _inside_roots(cls, value: str, info: ValidationInfo) -> str:
        if not value.endswith(WEIGHT_FILE_SUFFIXES):
            raise ValueError(f"use a {' / '.join(WEIGHT_FILE_SUFFIXES)} file, got {value!r}")
        return str(resolve_data_path(value, _data_roots(info), file=True))


class NoWeights(_Strict):
    """From scratch (timm's initialisation): the paper's baseline row."""

    kind: Literal["none"] = "none"


WeightsSource = Annotated[
    PretrainJobWeights | MlflowRunWeights | FileWeights | NoWeights, Field(discriminator="kind")
]


class ClassifierSpec(_Strict):
    """The timm classifier to fine-tune (its classes come from the data)."""

    backbone: Backbone = "resnet50"
    input_size: InputSize = 224


class FinetuneDataSpec(_Strict):
    """Labelled images (one sub-folder per class): ``train``, and ``val`` or a stratified
    ``val_fraction`` of ``train``."""

    train: DataSource
    val: DataSource | None = None
    val_fraction: float = Field(default=0.2, ge=0.05, le=0.5)
    split_seed: int = Field(
        default=0, ge=0, le=2**31 - 1, description="seeds the split: fixed across job seeds"
    )
    loader_workers: int = Field(default=0, ge=0, le=32)

    @field_validator("train", "val", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> Any:
        return _default_kind(value)


class RecipeSpec(_Strict):
    """The protocol's hyper-parameters; each one omitted takes the official table's value
    for the backbone (``sparkctl validate --json`` shows them; docs/finetune-recipe.md)."""

    batch_size: int | None = Field(default=None, ge=1, le=65_536, description="global batch")
    epochs: int | None = Field(default=None, ge=1, le=10_000)
    warmup_epochs: float | None = Field(default=None, ge=0.0, le=10_000)
    optimizer: Literal["lamb", "adamw"] | None = None
    base_lr: float | None = Field(default=None, gt=0.0, le=1.0, description="lr per 256 images")
    lr_scale: float | None = Field(default=None, gt=0.0, le=1.0, description="layer decay")
    weight_decay: float | None = Field(default=None, ge=0.0, le=1.0)
    mixup: float | None = Field(default=None, ge=0.0, le=10.0)
    cutmix: float | None = Field(default=None, ge=0.0, le=10.0)
    label_smoothing: float | None = Field(default=None, ge=0.0, lt=1.0)
    rep_aug: int | None = Field(default=None, ge=0, le=8)
    drop_path: float | None = Field(default=None, ge=0.0, lt=1.0)
    ema_decay: float | None = Field(default=None, ge=0.0, lt=1.0)
    clip_grad: float | None = Field(default=None, ge=0.0, le=1000.0, description="0 = off")

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class RuntimeSpec(_Strict):
    """How the steps run (not part of the recipe). bf16 autocast or fp32 (the reference's);
    no fp16, which would need loss scaling."""

    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    log_every: int = Field(default=10, ge=1, le=10_000)


class FinetuneTrackingSpec(_Strict):
    experiment: Name | None = None
    register_model: bool = Field(
        default=False, description="register the fine-tuned classifier under the job's name"
    )


class FinetuneSpec(_Strict):
    """One fine-tuning job: the paper's downstream protocol on a timm classifier."""

    name: Name = "spark-finetune"
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=32)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    model: ClassifierSpec = Field(default_factory=ClassifierSpec)
    weights: WeightsSource
    data: FinetuneDataSpec
    recipe: RecipeSpec = Field(default_factory=RecipeSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failures: FailureSpec = Field(default_factory=FailureSpec)
    tracking: FinetuneTrackingSpec = Field(default_factory=FinetuneTrackingSpec)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneSpec:
        errors = []
        workers = self.resources.num_workers
        batch = self.recipe.batch_size
        if batch is not None and batch < workers:
            errors.append(
                (
                    ("recipe", "batch_size"),
                    batch,
                    f"is below resources.num_workers={workers}: each worker needs a batch",
                )
            )
        train = self.data.train
        if isinstance(train, SyntheticData) and train.classes < 2:
            errors.append((("data", "train", "classes"), train.classes, "needs 2 or more"))
        _raise_conflicts(type(self).__name__, "spec_conflict", errors)
        return self

    def effective_recipe(self) -> Any:
        """The official recipe of the backbone with this spec's overrides, and the table row
        it came from (imports spark_core: workers and the CLI only)."""
        import dataclasses

        from spark_core.finetune import finetune_recipe

        recipe, row = finetune_recipe(self.model.backbone, self.model.input_size)
        overrides = {"input_size": self.model.input_size, **self.recipe.overrides()}
        return dataclasses.replace(recipe, **overrides), row

    def flat_params(self) -> dict[str, str]:
        """The spec as flat MLflow params, tags excluded, with every recipe value in use."""
        flat = flatten(self.model_dump(mode="json", exclude={"tags", "recipe"}))
        recipe, row = self.effective_recipe()
        flat.update({f"recipe.{k}": str(v) for k, v in recipe.__dict__.items()})
        flat["recipe.table_row"] = row
        return flat


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return flat


def parse_document(
    spec_type: type[SpecT],
    data: Any,
    *,
    data_roots: Sequence[Path | str] | None = None,
    source: str = "spec",
) -> SpecT:
    """Validate a mapping as a ``spec_type``; :class:`SpecError` names each bad field.

    ``data_roots`` are the folders data paths must lie under (default: the settings').
    """
    context = {"data_roots": list(data_roots)} if data_roots is not None else None
    if not isinstance(data, Mapping):
        raise SpecError([("", f"expected a mapping of fields, got {type(data).__name__}")], source)
    try:
        return spec_type.model_validate(data, context=context)
    except ValidationError as error:
        raise SpecError.from_validation_error(error, source) from None


def parse_spec(
    data: Any, *, data_roots: Sequence[Path | str] | None = None, source: str = "spec"
) -> PretrainSpec:
    """Validate a mapping as a :class:`PretrainSpec`."""
    return parse_document(PretrainSpec, data, data_roots=data_roots, source=source)


def ship(spec: _Strict, data_roots: Sequence[Path | str]) -> dict[str, Any]:
    """A validated spec as plain data for another Ray process (a Train worker, an evaluation
    task, a Tune trial), which re-validates it with :func:`unship` against the same roots:
    data paths are checked again where they are read."""
    return {
        "type": type(spec).__name__,
        "spec": spec.model_dump(mode="json"),
        "data_roots": [str(root) for root in data_roots],
    }


def unship(package: Mapping[str, Any]) -> Any:
    """The spec :func:`ship` packed, validated again on this node (any job kind's spec)."""
    from orchestrator.kinds import spec_types  # the registry imports this module

    spec_type = spec_types()[package["type"]]
    return parse_document(spec_type, package["spec"], data_roots=package["data_roots"])


def read_spec_file(path: str | Path) -> Any:
    """Parse a YAML or JSON file (YAML is a superset of JSON) into plain data."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise SpecError([("", f"cannot read {path}: {error.strerror}")], str(path)) from None
    if size > MAX_SPEC_BYTES:
        raise SpecError([("", f"file is {size} bytes; the limit is {MAX_SPEC_BYTES}")], str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError([("", f"cannot read {path}: {error.strerror}")], str(path)) from None
    except UnicodeDecodeError as error:
        raise SpecError([("", f"not valid YAML/JSON: {error}")], str(path)) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise SpecError([("", f"not valid YAML/JSON: {error}")], str(path)) from None
    if data is None:
        raise SpecError([("", "the file is empty: it needs at least a data section")], str(path))
    return data


def load_spec(path: str | Path, *, data_roots: Sequence[Path | str] | None = None) -> PretrainSpec:
    """Read and validate a spec file (``.yaml``, ``.yml`` or ``.json``)."""
    return parse_spec(read_spec_file(path), data_roots=data_roots, source=str(path))


# ------------------------------------------------------------------------------ sweeps

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform")
SweepValue = bool | int | float | str
FINETUNE_METRIC = "finetune_top1"
METRICS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        # name -> (mode, evaluation method that produces it, or "" for training metrics)
        "linear_probe_top1": ("max", "linear_probe"),
        "knn_top1": ("max", "knn"),
        FINETUNE_METRIC: ("max", ""),  # produced by the sweep's finetune section
        "final_loss": ("min", ""),
    }
)


class Distribution(_Strict):
    """One of ``{grid: [v, ...]}``, ``{choice: [v, ...]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (hi exclusive) or
    ``{quniform: [lo, hi, q]}``."""

    grid: list[SweepValue] | None = Field(default=None, min_length=1, max_length=64)
    choice: list[SweepValue] | None = Field(default=None, min_length=1, max_length=64)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    quniform: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {given})")
        bounds = self.uniform or self.loguniform or self.randint or self.quniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"the lower bound must be below the upper bound, got {bounds}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        if self.quniform is not None and self.quniform[2] <= 0:
            raise ValueError("the quniform step must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    def probe_values(self) -> list[SweepValue]:
        """The values to check against the base spec (all listed values, or the bounds)."""
        if self.grid is not None or self.choice is not None:
            return list(self.grid or self.choice or [])
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        low, high = (self.uniform or self.loguniform or self.quniform)[:2]  # type: ignore[index]
        return [low, high]


class SchedulerSpec(_Strict):
    """Early stopping: ``asha`` stops trials whose pre-training loss lags (on epochs)."""

    kind: Literal["none", "asha"] = "none"
    grace_period: int = Field(default=1, ge=1, le=10_000)
    reduction_factor: float = Field(default=2.0, gt=1.0, le=16.0)


class DownstreamSpec(_Strict):
    """A sweep's fine-tuning of each trial's encoder with the paper's protocol: a fine-tune
    run nested under the trial's run, whose ``finetune_top1`` scores the trial. The backbone
    is the base spec's; a trial with ``optim.epochs: 0`` fine-tunes from scratch."""

    input_size: InputSize | None = Field(default=None, description="default: the base's")
    data: FinetuneDataSpec
    recipe: RecipeSpec = Field(default_factory=RecipeSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failures: FailureSpec = Field(default_factory=FailureSpec)

    def trial_spec(
        self, trial: PretrainSpec, *, weights: dict[str, Any], context: Any = None
    ) -> FinetuneSpec:
        """The fine-tuning job of one trial, from ``weights`` (a weights-source mapping);
        named after the trial (``<trial name>-finetune``, shortened to fit)."""
        data = self.model_dump(mode="json", exclude={"input_size"})
        data.update(
            name=f"{trial.name[: NAME_MAX_LENGTH - len(FINETUNE_NAME_SUFFIX)]}"
            f"{FINETUNE_NAME_SUFFIX}",
            seed=trial.seed,
            model={
                "backbone": trial.model.backbone,
                "input_size": self.input_size or trial.model.input_size,
            },
            weights=weights,
            tracking={"experiment": trial.tracking.experiment},
        )
        return FinetuneSpec.model_validate(data, context=context)


class SweepSpec(_Strict):
    """An ablation sweep: a base pre-training spec, a search space and named variants."""

    name: Name = "spark-sweep"
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=32)
    base: PretrainSpec
    search: dict[str, Distribution] = Field(default_factory=dict, max_length=16)
    variants: dict[Name, dict[str, SweepValue]] = Field(default_factory=dict, max_length=64)
    cross_variants: bool = Field(
        default=True, description="run every variant with every search point (else variants only)"
    )
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(default=1, ge=1, le=1000)
    max_concurrent_trials: int = Field(
        default=0, ge=0, le=1000, description="0 = as resources allow"
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: Literal[tuple(METRICS)] = "linear_probe_top1"  # type: ignore[valid-type]
    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(
        default_factory=lambda: [0], min_length=1, max_length=32
    )
    max_failures_per_trial: int = Field(default=0, ge=0, le=10)
    finetune: DownstreamSpec | None = Field(
        default=None,
        description="fine-tune every trial's encoder with the paper's protocol (metric "
        "finetune_top1)",
    )

    @property
    def mode(self) -> str:
        return METRICS[self.metric][0]

    def trial_count(self) -> int:
        """Trials Tune runs in all: every grid value x variant x seed, ``num_samples`` times
        (choice and range distributions are sampled, one value per trial)."""
        count = self.num_samples * len(self.seeds) * max(len(self.variants), 1)
        if self.cross_variants or not self.variants:
            for distribution in self.search.values():
                count *= len(distribution.grid) if distribution.grid is not None else 1
        return count

    def concurrent_trials(self) -> int:
        """Trials that may run at once: ``max_concurrent_trials``, or every trial when it is 0
        (Tune's "as resources allow")."""
        total = self.trial_count()
        return min(self.max_concurrent_trials, total) if self.max_concurrent_trials else total

    @model_validator(mode="after")
    def _check_against_base(self, info: ValidationInfo) -> SweepSpec:
        errors = list(self._sweep_errors(info.context))
        _raise_conflicts(type(self).__name__, "sweep_conflict", errors)
        return self

    def _sweep_errors(self, context: Any):
        base = self.base.model_dump(mode="json")
        evaluation = METRICS[self.metric][1]
        if evaluation and self.base.evaluation.method != evaluation:
            yield (
                ("metric",),
                self.metric,
                f"needs base.evaluation.method: {evaluation} (it is {self.base.evaluation.method})",
            )
        if self.metric == FINETUNE_METRIC and self.finetune is None:
            yield (
                ("metric",),
                self.metric,
                "needs a finetune section (the fine-tuning of every trial's encoder)",
            )
        if self.finetune is not None:
            problem = _downstream_problem(self, context)
            if problem:
                yield (("finetune",), None, problem)
        if self.algorithm == "optuna" and any(d.grid is not None for d in self.search.values()):
            yield (("algorithm",), self.algorithm, "optuna cannot search a grid; use choice")
        if self.algorithm == "grid" and any(
            d.grid is None and d.choice is None for d in self.search.values()
        ):
            yield (
                ("algorithm",),
                self.algorithm,
                "a grid search needs grid or choice values; use algorithm random or optuna "
                "for uniform/loguniform/randint/quniform",
            )
        for path, distribution in self.search.items():
            for value in distribution.probe_values():
                problem = _override_problem(base, {path: value}, context)
                if problem:
                    yield (("search", path), value, f"value {value!r}: {problem}")
        for variant, overrides in self.variants.items():
            problem = _override_problem(base, overrides, context)
            if problem:
                yield (("variants", variant), overrides, problem)
        if self.algorithm == "optuna" and (self.variants or len(self.seeds) > 1):
            yield (
                ("algorithm",),
                self.algorithm,
                "optuna searches one space: drop variants and extra seeds, or use grid/random",
            )
        if self.scheduler.kind == "asha" and self.base.optim.epochs < 2:
            yield (("scheduler", "kind"), "asha", "ASHA needs base.optim.epochs >= 2")

    def trial_spec(
        self, params: Mapping[str, Any], variant: str | None, seed: int, context: Any = None
    ) -> PretrainSpec:
        """The pre-training spec of one trial: base + variant overrides + searched values."""
        overrides: dict[str, Any] = {}
        if variant is not None:
            overrides.update(self.variants[variant])
        overrides.update(params)
        data = apply_overrides(self.base.model_dump(mode="json"), overrides)
        data["seed"] = seed
        return PretrainSpec.model_validate(data, context=context)


def _downstream_problem(sweep: SweepSpec, context: Any) -> str:
    """Why the sweep's finetune section cannot fine-tune the base's encoder ('' if it can)."""
    assert sweep.finetune is not None
    try:
        sweep.finetune.trial_spec(sweep.base, weights={"kind": "none"}, context=context)
    except ValidationError as error:
        return "; ".join(f"{field_path(e['loc'])}: {_message(e['msg'])}" for e in error.errors())
    return ""


def apply_overrides(tree: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``tree`` with each dotted path in ``overrides`` set (paths must exist)."""
    import copy

    out = copy.deepcopy(tree)
    for path, value in overrides.items():
        node = out
        parts = path.split(".")
        for part in parts[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                raise KeyError(path)
            node = child
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise KeyError(path)
        node[parts[-1]] = value
    return out


def _override_problem(base: dict[str, Any], overrides: Mapping[str, Any], context: Any) -> str:
    """Why ``overrides`` cannot apply to the base spec ('' when they can)."""
    try:
        data = apply_overrides(base, overrides)
    except KeyError as error:
        return (
            f"{error.args[0]!r} is not a field of the base spec (dotted paths such as "
            "spark.mask_ratio, spark.decoder_depth, optim.base_lr)"
        )
    try:
        PretrainSpec.model_validate(data, context=context)
    except ValidationError as error:
        return "; ".join(f"{field_path(e['loc'])}: {_message(e['msg'])}" for e in error.errors())
    return ""


def parse_sweep(
    data: Any, *, data_roots: Sequence[Path | str] | None = None, source: str = "sweep spec"
) -> SweepSpec:
    """Validate a mapping as a :class:`SweepSpec` (the base and every trial's values)."""
    return parse_document(SweepSpec, data, data_roots=data_roots, source=source)


def load_sweep(path: str | Path, *, data_roots: Sequence[Path | str] | None = None) -> SweepSpec:
    return parse_sweep(read_spec_file(path), data_roots=data_roots, source=str(path))

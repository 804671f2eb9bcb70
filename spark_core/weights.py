"""Source weights of a fine-tuning job, loaded into a timm classifier.

The SparK downstream protocol fine-tunes a timm ResNet / ConvNeXt from a pre-trained
encoder. The encoder comes in one of three layouts, all loaded by the same two calls::

    net = timm.create_model(backbone, num_classes=K)
    report = load_source_weights(net, read_weights_file(path), source=str(path))

* ``timm``: timm's own key names, e.g. the authors' ``resnet50_1kpretrained_timm_style.pth``
  or :func:`spark_core.checkpoint.export_encoder`'s ``.safetensors``;
* ``official-convnext``: the facebookresearch/ConvNeXt key names of the authors'
  ``convnext*_1kpretrained_official_style.pth``, mapped onto timm with timm's own
  ``checkpoint_filter_fn``;
* ``spark-checkpoint``: a :func:`spark_core.checkpoint.save_checkpoint` training checkpoint,
  of which the encoder is taken (exactly what ``export_encoder`` would have written).

Loading is strict except for the classifier, which is new (``K`` classes): a tensor the
model lacks, a model tensor the file lacks, or a shape that differs is a
:class:`WeightsError` naming the keys, never a silently half-initialised network.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm.models.convnext as timm_convnext
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from spark_core.checkpoint import CHECKPOINT_FORMAT, encoder_state_dict
from spark_core.model import SparK, SparKConfig

_logger = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("timm", "official-convnext", "spark-checkpoint", "none")
TORCH_SUFFIXES: tuple[str, ...] = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
# Keys under which training scripts nest the state dict, looked up in this order.
CONTAINER_KEYS: tuple[str, ...] = ("module", "model", "state_dict", "state")
DDP_PREFIX = "module."
# Where a spark_core SparK keeps its timm backbone: ``SparK.encoder.model``.
SPARK_ENCODER_PREFIX = "encoder.model."
# BatchNorm's step counter: not a weight, harmless when absent on either side.
NUM_BATCHES_TRACKED = "num_batches_tracked"
# timm ConvNeXt's final norm, which the official-style pre-trained files lack by construction.
CONVNEXT_HEAD_NORM = "head.norm"
_MAX_NAMED = 20
_MAX_NESTING = 4
_OFFICIAL_CONVNEXT_KEY = re.compile(
    r"^(downsample_layers\.\d+\.\d+\.|stages\.\d+\.\d+\.(dwconv|pwconv\d|norm|gamma|grn)\b)"
)
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_IS_PRETRAIN_HINT = (
    "*_withdecoder_1kpretrained_spark_style.pth holds the encoder and decoder in SparK's "
    "pre-training layout, for resuming pre-training; for fine-tuning use the authors' "
    "*_1kpretrained_timm_style.pth (ResNet) or *_1kpretrained_official_style.pth (ConvNeXt) "
    "file."
)


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_source_weights` did.

    Attributes:
        source: what was loaded, e.g. the file path, or ``"none"``.
        layout: the file's key layout, one of :data:`LAYOUTS`.
        loaded: number of tensors copied into the model.
        missing: model keys the file did not provide, sorted: the classifier (and ConvNeXt's
            ``head.norm`` for the official layout), plus BatchNorm ``num_batches_tracked``
            counters; all keep the model's own initial values.
        unexpected: file keys the model has no place for that were dropped as harmless
            (BatchNorm ``num_batches_tracked`` only), sorted. Classifier tensors of the file
            are dropped too but not listed here: the head is replaced by design.
    """

    source: str
    layout: str
    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


class WeightsError(ValueError):
    """Source weights refused: unreadable, unsafe, or not matching the model.

    The message names the offending keys (the first few) and says how to fix it.
    """


class SourceWeights(dict[str, torch.Tensor]):
    """A state dict as returned by :func:`read_weights_file`.

    A plain ``dict`` of tensors that also remembers ``layout`` when the file itself says
    which layout it is in (``"spark-checkpoint"``), so that :func:`to_timm_layout` can
    report it; ``None`` means "detect from the keys".
    """

    def __init__(self, state: Mapping[str, torch.Tensor], layout: str | None = None) -> None:
        super().__init__(state)
        self.layout = layout


# --------------------------------------------------------------------------- reading


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file as a state dict of CPU tensors, never running code from it.

    * ``.safetensors``: read with ``safetensors.torch.load_file``.
    * ``.pth`` / ``.pt``: read with ``torch.load(weights_only=True)``: only tensors,
      numbers, strings and containers are unpickled; a file holding other Python objects
      is refused. The usual containers are unwrapped (``{"module": sd}``, ``{"model": sd}``,
      ``{"state_dict": sd}``, ``{"state": sd}``); a spark_core training checkpoint gives
      its encoder in timm's layout (as :func:`spark_core.checkpoint.export_encoder` would).

    Returns:
        A :class:`SourceWeights` (a ``dict``) mapping keys to tensors.

    Raises:
        WeightsError: no such file, unknown suffix, unreadable or unsafe file, the authors'
            pre-training (``is_pretrain``) checkpoint, or values that are not tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; give the path of a .safetensors or .pth file")
    if path.suffix == SAFETENSORS_SUFFIX:
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise WeightsError(
                f"{path}: not a readable safetensors file ({error}); re-export it, e.g. with "
                "spark_core.checkpoint.export_encoder or safetensors.torch.save_file"
            ) from None
        return SourceWeights(_check_state(state, path))
    if path.suffix not in TORCH_SUFFIXES:
        raise WeightsError(
            f"{path}: unknown suffix {path.suffix!r}; weights files are "
            f"{SAFETENSORS_SUFFIX} or {' / '.join(TORCH_SUFFIXES)} (rename the file if it is "
            "one of these)"
        )
    payload = _torch_load(path)
    if isinstance(payload, Mapping) and payload.get("format") == CHECKPOINT_FORMAT:
        return SourceWeights(_spark_checkpoint_encoder(payload, path), layout="spark-checkpoint")
    return SourceWeights(_unwrap(payload, path))


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSUPPORTED_GLOBAL.search(str(error))
        if found is None:
            raise WeightsError(
                f"{path}: not a readable torch file (torch.load: "
                f"{_first_line(error)}); check that it is complete and was written by "
                "torch.save"
            ) from None
        hint = (
            " It looks like the authors' pre-training checkpoint: " + _IS_PRETRAIN_HINT
            if "spark_style" in path.name
            else ""
        )
        raise WeightsError(
            f"{path}: refused, the file holds Python objects (e.g. {found.group(1)}), not "
            "only tensors, and unpickling them could run arbitrary code. Source weights must "
            "be a plain state dict: save `{name: tensor}` with torch.save(model.state_dict(), "
            f"path) or safetensors.torch.save_file.{hint}"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise WeightsError(
            f"{path}: not a readable torch file ({type(error).__name__}: "
            f"{_first_line(error)}); check that it is complete and was written by torch.save"
        ) from None


def _unwrap(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside the usual containers; refuses anything else."""
    current = payload
    for _ in range(_MAX_NESTING):
        if not isinstance(current, Mapping):
            raise WeightsError(
                f"{path}: holds a {type(current).__name__}, not a state dict; save "
                "model.state_dict() (a dict of tensors)"
            )
        if current.get("is_pretrain") is True:
            raise WeightsError(
                f"{path}: the authors' pre-training checkpoint. " + _IS_PRETRAIN_HINT
            )
        if current and all(isinstance(v, torch.Tensor) for v in current.values()):
            break
        container = next((k for k in CONTAINER_KEYS if isinstance(current.get(k), Mapping)), None)
        if container is None:
            break
        current = current[container]
    return _check_state(current, path)


def _check_state(state: Any, where: object) -> dict[str, torch.Tensor]:
    """A plain dict of tensors keyed by strings, or a WeightsError naming the bad entries."""
    if not isinstance(state, Mapping):
        raise WeightsError(
            f"{where}: holds a {type(state).__name__}, not a state dict; save "
            "model.state_dict() (a dict of tensors)"
        )
    if not state:
        raise WeightsError(f"{where}: holds no tensors; save model.state_dict() into it")
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in state.items()
        if not isinstance(k, str) or not isinstance(v, torch.Tensor)
    ]
    if bad:
        raise WeightsError(
            f"{where}: a state dict must map names to tensors, but {len(bad)} entries do not: "
            f"{_names(bad)}. Save only model.state_dict() (a training checkpoint's other "
            f"entries go elsewhere, or under one of the keys {list(CONTAINER_KEYS)})"
        )
    return dict(state)


def _spark_checkpoint_encoder(payload: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The encoder of a spark_core training checkpoint, as ``export_encoder`` writes it.

    The SparK is rebuilt from the checkpoint's config so that the layers pruned for
    pre-training (e.g. ConvNeXt's head norm) come back at timm's initial values, exactly
    as :func:`spark_core.checkpoint.encoder_state_dict` gives them. The global RNG is left
    untouched (building a model draws random initial values).
    """
    state = _check_state(payload.get("model"), f"{path} ['model']")
    try:
        config = SparKConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(
            f"{path}: a spark_core checkpoint whose config cannot be read ({error}); it was "
            "written by another spark_core version or altered: export its encoder with the "
            "version that wrote it (spark_core.checkpoint.export_encoder)"
        ) from None
    with torch.random.fork_rng(devices=[]):
        try:
            spark = SparK(config)
        except ValueError as error:
            raise WeightsError(
                f"{path}: a spark_core checkpoint with an invalid config ({error}); export its "
                "encoder with the spark_core version that wrote it"
            ) from None
    try:
        spark.load_state_dict(state)
    except RuntimeError as error:
        raise WeightsError(
            f"{path}: a spark_core checkpoint whose weights do not match its own config "
            f"({_first_line(error)}); it was altered or is incomplete"
        ) from None
    encoder = encoder_state_dict(spark)
    _logger.info(
        "%s: spark_core checkpoint of a %s SparK; using its encoder (%d tensors, keys %s*)",
        path,
        config.backbone,
        len(encoder),
        SPARK_ENCODER_PREFIX,
    )
    return encoder


# --------------------------------------------------------------------------- layouts


def to_timm_layout(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], str]:
    """Detect the key layout of ``state`` and convert it to ``model``'s (timm's) keys.

    * A leading ``module.`` (DistributedDataParallel) on every key is stripped.
    * Official facebookresearch/ConvNeXt keys (``downsample_layers.*``,
      ``stages.i.j.dwconv``, ``norm.*``, ``head.*``) are mapped with timm's own
      ``timm.models.convnext.checkpoint_filter_fn`` (which needs the model: it reshapes the
      linear MLP weights to the conv MLP of e.g. ``convnext_atto``).
    * Anything else is taken to be in timm's layout already, as is a
      :class:`SourceWeights` read from a spark_core checkpoint.

    Returns:
        ``(state, layout)`` with layout ``"timm"``, ``"official-convnext"`` or
        ``"spark-checkpoint"``.

    Raises:
        WeightsError: non-tensor values, or official ConvNeXt keys that do not fit the model.
    """
    hint = getattr(state, "layout", None)
    converted = _check_state(state, "source weights")
    if all(k.startswith(DDP_PREFIX) for k in converted) and not any(
        k.startswith(DDP_PREFIX) for k in model.state_dict()
    ):
        converted = {k[len(DDP_PREFIX) :]: v for k, v in converted.items()}
    if hint is not None:
        return converted, hint
    official = [k for k in converted if _OFFICIAL_CONVNEXT_KEY.match(k)]
    if not official:
        return converted, "timm"
    if not isinstance(model, timm_convnext.ConvNeXt):
        raise WeightsError(
            f"the weights use the official ConvNeXt key names ({_names(official)}) but the "
            f"model is a {type(model).__name__} ({_architecture(model)}); build the model "
            "with the ConvNeXt the weights were pre-trained with, e.g. "
            "timm.create_model('convnext_small', num_classes=K)"
        )
    try:
        mapped = timm_convnext.checkpoint_filter_fn(converted, model)
    except (KeyError, RuntimeError):
        key, problem = _unmappable_official_key(converted, model)
        raise WeightsError(
            f"official ConvNeXt weights do not fit the model ({_architecture(model)}): {key!r} "
            f"{problem}; is it the encoder of another ConvNeXt? Build the model with the "
            "backbone the weights were pre-trained with"
        ) from None
    return dict(mapped), "official-convnext"


def _unmappable_official_key(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[str, str]:
    """The first key timm's ConvNeXt mapping fails on, and why (for the error message)."""
    own = model.state_dict()
    for key, value in state.items():
        try:
            timm_convnext.checkpoint_filter_fn({key: value}, model)
        except KeyError as error:
            return key, f"maps to {error.args[0]!r}, which the model does not have"
        except RuntimeError:
            target = re.sub(r"stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
            target = target.replace("pwconv", "mlp.fc")
            shape = tuple(own[target].shape) if target in own else "?"
            return key, f"has shape {tuple(value.shape)}, model {target!r} has {shape}"
    return "?", "could not be mapped"


# --------------------------------------------------------------------------- loading


def load_source_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor] | None, *, source: str
) -> LoadReport:
    """Load pre-trained weights into a timm classifier built with ``num_classes=K``.

    The classifier (``model.pretrained_cfg["classifier"]``, e.g. ``fc`` for ResNet,
    ``head.fc`` for ConvNeXt) is new: classifier tensors in the file are dropped (and
    logged), and the model's keeps its initial values. Every other tensor must match:

    * file keys the model lacks are refused (the encoder of another backbone?), except
      BatchNorm ``num_batches_tracked`` counters, dropped and listed in ``unexpected``;
    * model keys the file lacks are refused, except ``num_batches_tracked`` counters and,
      for the official ConvNeXt layout only, ``head.norm``: the authors' official-style
      ConvNeXt files are saved from a model built with ``num_classes=0``, which has no
      final norm, and the reference fine-tunes with it freshly initialised;
    * shapes must be equal.

    Args:
        model: the timm classifier, modified in place.
        state: a state dict (e.g. from :func:`read_weights_file`), or ``None`` to train
            from scratch: nothing is loaded, the report has layout ``"none"``, ``loaded=0``
            and empty ``missing`` / ``unexpected`` (there is no file to compare with).
        source: what the weights are, for the report and messages (e.g. the file path).

    Returns:
        A :class:`LoadReport`.

    Raises:
        WeightsError: unexpected or missing keys, shape mismatches; the message names them
            (the first few) and says how to fix it.
    """
    if state is None:
        _logger.info("no source weights: %s trains from scratch", _architecture(model))
        return LoadReport(source=source, layout="none", loaded=0, missing=(), unexpected=())
    state, layout = to_timm_layout(state, model)
    own = model.state_dict()
    classifier = _classifier_prefixes(model)
    may_miss = classifier + ((CONVNEXT_HEAD_NORM,) if layout == "official-convnext" else ())

    dropped = sorted(k for k in state if _under(k, classifier))
    harmless = sorted(k for k in state if k not in own and _is_counter(k) and k not in dropped)
    skip = set(dropped) | set(harmless)
    unexpected = [k for k in state if k not in own and k not in skip]
    missing = [k for k in own if k not in state and not _under(k, may_miss) and not _is_counter(k)]
    mismatched = [
        f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and k not in skip and v.shape != own[k].shape
    ]
    problems = []
    if unexpected:
        problems.append(
            f"{len(unexpected)} keys of the file are not in the model: {_names(unexpected)} "
            "(is it the encoder of another backbone?)"
        )
    if missing:
        problems.append(
            f"{len(missing)} keys of the model are not in the file: {_names(missing)} (only "
            f"the classifier {list(may_miss)} may be missing: is the file incomplete, or the "
            "encoder of another backbone?)"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} shapes differ: {_names(mismatched)}")
    if problems:
        raise WeightsError(
            f"{source} ({layout} layout) does not fit {_architecture(model)}: "
            + "; ".join(problems)
            + ". Build the model with the backbone the weights were pre-trained with "
            "(timm.create_model(backbone, num_classes=K)), or give the matching file."
        )

    to_load = {k: v for k, v in state.items() if k in own and k not in skip}
    model.load_state_dict(to_load, strict=False)
    new = tuple(sorted(k for k in own if k not in to_load))
    if dropped:
        _logger.info(
            "%s: dropped %d classifier tensors of the file (the head is new): %s",
            source,
            len(dropped),
            _names(dropped),
        )
    _logger.info(
        "%s: loaded %d tensors (%s layout) into %s; initialised anew: %s",
        source,
        len(to_load),
        layout,
        _architecture(model),
        _names(new) if new else "nothing",
    )
    return LoadReport(
        source=source,
        layout=layout,
        loaded=len(to_load),
        missing=new,
        unexpected=tuple(harmless),
    )


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The classifier's module names, from timm's pretrained config (e.g. ``("fc",)``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, str):
        names = (names,)
    if not names:
        raise WeightsError(
            f"{type(model).__name__} has no pretrained_cfg['classifier'] naming its classifier; "
            "build the model with timm.create_model(backbone, num_classes=K)"
        )
    return tuple(names)


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _is_counter(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == NUM_BATCHES_TRACKED


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    more = len(items) - _MAX_NAMED
    return shown + (f" ... and {more} more" if more > 0 else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = [
    "LAYOUTS",
    "LoadReport",
    "SourceWeights",
    "WeightsError",
    "load_source_weights",
    "read_weights_file",
    "to_timm_layout",
]

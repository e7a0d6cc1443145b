"""Checkpoint I/O: the official plain state dicts, our self-describing files, Lightning .ckpt.

Three kinds of file load through :func:`load_model`:

- ``"plain"``: a guided-diffusion state dict (the released guided-diffusion / ILVR / P2 ``.pt``
  files). It does not describe itself, so a preset name or the README's flag string is
  needed (either gives the UNet and the diffusion; a bare :class:`UNetConfig` the UNet only).
- ``"ilvr_toolkit"``: ``{"format": "ilvr_toolkit.model/1", "unet": {...}, "diffusion": {...},
  "state_dict": {...}, "extra": {...}}`` written by :func:`save_model_file`.
- ``"lightning"``: a Lightning checkpoint whose ``hyper_parameters`` hold ``unet`` (a
  UNetConfig dict) and ``diffusion``; the UNet weights are ``state_dict`` entries under
  ``model.``.

Every load uses ``torch.load(..., weights_only=True)``; every save is atomic.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_open
from .config import PRESET_FLAGS, PRESETS, UNetConfig, get_preset, preset_for_filename
from .flags import diffusion_settings
from .unet import UNetModel, build_unet

__all__ = [
    "MODEL_FORMAT",
    "CheckpointError",
    "LoadedModel",
    "check_state_dict",
    "infer_architecture",
    "load_model",
    "load_state_dict_file",
    "save_model_file",
    "save_plain_state_dict",
    "sha256_file",
]

MODEL_FORMAT = "ilvr_toolkit.model/1"
_DDP_PREFIX = "module."
_LIGHTNING_PREFIX = "model."

PathLike = str | os.PathLike[str]
StateDict = Mapping[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the architecture it is loaded into."""


@dataclass
class LoadedModel:
    """A network ready for inference and what is known about it."""

    model: UNetModel
    unet_config: UNetConfig
    diffusion: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    source_kind: str = "plain"  # "plain" | "ilvr_toolkit" | "lightning"


# --------------------------------------------------------------------------- files
def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict_file(path: PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that say what went wrong.

    Returns the stored object (for an official file: the plain state dict).
    Raises FileNotFoundError for a missing file, CheckpointError for an unreadable one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointError(
                f"{path} holds Python objects that weights_only=True refuses to unpickle; "
                "re-save it with plain containers (dict/list/str/numbers) and tensors only"
            ) from err
        raise _unreadable(path, err) from err
    except Exception as err:  # zip errors (RuntimeError), EOFError, KeyError on garbage ...
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    size = path.stat().st_size
    return CheckpointError(
        f"{path} is not a readable PyTorch checkpoint (truncated or corrupted?); "
        f"size {size} bytes; torch.load said: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    )


def _atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temp file next to ``path``, fsync, then ``os.replace``."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def _plain_tensors(state_dict: StateDict | nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def _require_plain(obj: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back."""
    if obj is None or isinstance(obj, str | int | float | bool | torch.Tensor):
        return
    if isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            _require_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} is not a str/int")
            _require_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__name__}; only plain containers, numbers, str and tensors load with weights_only=True"
    )


def save_model_file(
    path: PathLike,
    unet_config: UNetConfig,
    state_dict: StateDict | nn.Module,
    diffusion: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a self-describing model file (config + weights) atomically.

    The weights are checked against ``unet_config`` first, so the file never lies.
    """
    weights = check_state_dict(_plain_tensors(state_dict), unet_config)
    payload = {
        "format": MODEL_FORMAT,
        "unet": unet_config.to_dict(),
        "diffusion": dict(diffusion or {}),
        "state_dict": weights,
        "extra": dict(extra or {}),
    }
    _require_plain(payload, "model file")
    _atomic_save(payload, path)


def save_plain_state_dict(path: PathLike, state_dict: StateDict | nn.Module) -> None:
    """Write a bare guided-diffusion state dict atomically (loadable by the official code)."""
    weights = _plain_tensors(state_dict)
    weights = _strip_prefix(weights, _DDP_PREFIX)
    _atomic_save(weights, path)


# --------------------------------------------------------------------------- checking
def _strip_prefix(state_dict: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` when every key has it (DDP's ``module.``)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _expected_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    net = build_unet(config, device="meta")
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _block_index(keys: list[str], prefix: str) -> dict[int, set[str]]:
    """``{i: {sub-key after "prefix.i."}}`` for keys starting with ``prefix.``."""
    blocks: dict[int, set[str]] = {}
    for key in keys:
        if key.startswith(prefix + "."):
            index, _, rest = key[len(prefix) + 1 :].partition(".")
            if index.isdigit():
                blocks.setdefault(int(index), set()).add(rest)
    return blocks


def _upsampler_kind(subkeys: set[str]) -> str | None:
    """How an output block upsamples: ``"conv"`` (Upsample), ``"resblock"`` (resblock_updown) or None.

    The block's first child is always a ResBlock; an upsampler is a later ``conv`` or ResBlock.
    """
    for sub in subkeys:
        j, _, rest = sub.partition(".")
        if j != "0" and rest.startswith("conv."):
            return "conv"
        if j != "0" and rest.startswith("in_layers."):
            return "resblock"
    return None


def infer_architecture(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Read what the weights reveal about the architecture (from keys and shapes only).

    Returns keys among ``num_channels, in_channels, out_channels, num_classes,
    use_scale_shift_norm, channel_mult, num_res_blocks, attention_ds, resblock_updown``
    (those that could be inferred). Head counts and attention order leave no trace.
    """
    info: dict[str, Any] = {}
    keys = list(shapes)
    if "time_embed.0.weight" in shapes:
        info["num_channels"] = shapes["time_embed.0.weight"][1]
    if "input_blocks.0.0.weight" in shapes:
        info["in_channels"] = shapes["input_blocks.0.0.weight"][1]
    if "out.2.weight" in shapes:
        info["out_channels"] = shapes["out.2.weight"][0]
    info["num_classes"] = shapes["label_emb.weight"][0] if "label_emb.weight" in shapes else None
    emb = shapes.get("middle_block.0.emb_layers.1.weight")
    conv = shapes.get("middle_block.0.out_layers.3.weight")
    if emb and conv:
        info["use_scale_shift_norm"] = emb[0] == 2 * conv[0]
    out_blocks = _block_index(keys, "output_blocks")
    if not out_blocks or sorted(out_blocks) != list(range(len(out_blocks))):
        return info
    upsamplers = [kind for i in sorted(out_blocks) if (kind := _upsampler_kind(out_blocks[i]))]
    levels = 1 + len(upsamplers)
    if len(out_blocks) % levels:
        return info
    per_level = len(out_blocks) // levels
    info["num_res_blocks"] = per_level - 1
    widths, attention_ds = [], set()
    for i in range(len(out_blocks)):
        level = levels - 1 - i // per_level
        width = shapes.get(f"output_blocks.{i}.0.out_layers.3.weight", (None,))[0]
        if i % per_level == 0:
            widths.append(width)
        if any(sub.startswith("1.qkv.") for sub in out_blocks[i]):
            attention_ds.add(2**level)
    if "num_channels" in info and None not in widths:
        mult = [w / info["num_channels"] for w in reversed(widths)]
        info["channel_mult"] = tuple(int(m) if float(m).is_integer() else m for m in mult)
    info["attention_ds"] = tuple(sorted(attention_ds))
    if upsamplers:
        info["resblock_updown"] = upsamplers[0] == "resblock"
    return info


#: What the weights reveal (``infer_architecture``) -> the setting a user would change.
_SETTINGS = {
    "out_channels": "learn_sigma (6 output channels: learn_sigma True, 3: False)",
    "in_channels": "in_channels",
    "num_classes": "num_classes (class_cond: a label_emb table)",
    "num_channels": "num_channels",
    "num_res_blocks": "num_res_blocks",
    "channel_mult": "channel_mult (an empty one follows image_size, so check image_size too)",
    "attention_ds": "attention_resolutions (attention sits where image_size // resolution is the downsample rate)",
    "use_scale_shift_norm": "use_scale_shift_norm",
    "resblock_updown": "resblock_updown",
}


def _diagnose(found: dict[str, Any], config: UNetConfig) -> list[str]:
    """Name the settings that explain a mismatch between weights (``found``) and ``config``."""
    notes = []
    for key, setting in _SETTINGS.items():
        theirs, mine = found.get(key), getattr(config, key)
        mine = tuple(sorted(mine)) if key == "attention_ds" else mine
        if key in found and (tuple(theirs) != mine if isinstance(mine, tuple) else theirs != mine):
            notes.append(f"{setting}: the checkpoint has {key} {theirs!r}, the config {mine!r}")
    return notes


def _mismatch_summary(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str:
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    return "; ".join(parts)


def check_state_dict(
    state_dict: StateDict, config: UNetConfig, source: PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Check that ``state_dict`` fits the model ``config`` builds; return it cleaned.

    A DDP ``module.`` prefix is stripped. On any mismatch one CheckpointError names the
    likely wrong setting(s) (learn_sigma, channel_mult, image_size, ...), not every key.
    ``source`` (a file name) adds a hint when it is a known released checkpoint.
    """
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise CheckpointError(f"{source or 'the object'} is not a state dict (a mapping of names to tensors)")
    cleaned = _strip_prefix(state_dict, _DDP_PREFIX)
    shapes = {k: tuple(v.shape) for k, v in cleaned.items()}
    expected = _expected_shapes(config)
    if shapes == expected:
        return cleaned
    notes = _diagnose(infer_architecture(shapes), config) or [
        "the layout differs in a way no single setting explains"
    ]
    lines = [f"checkpoint{f' {source}' if source else ''} does not fit the UNet config:"]
    lines += [f"  - {note}" for note in notes]
    lines.append(f"  ({_mismatch_summary(shapes, expected)})")
    hint = _preset_hint(source, config)
    if hint:
        lines.append(f"  hint: {hint}")
    raise CheckpointError("\n".join(lines))


def _preset_hint(source: PathLike | None, config: UNetConfig) -> str:
    preset = preset_for_filename(source) if source is not None else None
    if preset is None:
        return ""
    name = Path(source).name
    if get_preset(preset).architecture() == config.architecture():
        return f"{name} is named like a released checkpoint (preset {preset!r}) but lacks its layout; is it another model?"
    return f"{name} is a released checkpoint; load it with preset={preset!r}"


# --------------------------------------------------------------------------- loading
def _classify(obj: Any, path: PathLike) -> str:
    if isinstance(obj, Mapping):
        if "format" in obj:
            if obj["format"] != MODEL_FORMAT:
                raise CheckpointError(
                    f"{path}: unsupported model file format {obj['format']!r} (expected {MODEL_FORMAT!r})"
                )
            return "ilvr_toolkit"
        if "state_dict" in obj and "hyper_parameters" in obj:
            return "lightning"
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return "plain"
    top = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{path}: unrecognised checkpoint contents ({top}); expected a plain state dict, "
        f"an {MODEL_FORMAT} file or a Lightning checkpoint with hyper_parameters['unet']"
    )


def _stored_config(value: Any, path: PathLike) -> UNetConfig:
    if isinstance(value, UNetConfig):
        return value
    try:
        return UNetConfig.from_dict(value)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the stored UNet config is invalid: {err}") from err


def _resolve_preset(preset: str | UNetConfig) -> UNetConfig:
    return preset if isinstance(preset, UNetConfig) else get_preset(preset)


def _reconcile(stored: UNetConfig, preset: str | UNetConfig | None, path: PathLike) -> UNetConfig:
    """The config to build: the stored one, checked against a preset if one was given.

    A UNetConfig passed as ``preset`` with the same architecture wins (it may carry other
    runtime settings such as ``attention_backend``).
    """
    if preset is None:
        return stored
    wanted = _resolve_preset(preset)
    stored_arch, wanted_arch = stored.architecture(), wanted.architecture()
    differ = {k: (v, wanted_arch[k]) for k, v in stored_arch.items() if wanted_arch[k] != v}
    if differ:
        details = ", ".join(f"{k}: file {a!r} vs preset {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(
            f"{path} describes a different architecture than preset {preset if isinstance(preset, str) else 'config'}: {details}"
        )
    return wanted if isinstance(preset, UNetConfig) else stored


def _unpack(
    obj: Any, kind: str, preset: str | UNetConfig | None, path: PathLike
) -> tuple[UNetConfig, StateDict, dict]:
    """(config, weights, diffusion settings) of a loaded checkpoint object."""
    if kind == "ilvr_toolkit":
        stored = _stored_config(obj["unet"], path)
        return _reconcile(stored, preset, path), obj["state_dict"], dict(obj.get("diffusion") or {})
    if kind == "lightning":
        hp = obj["hyper_parameters"]
        if "unet" not in hp:
            raise CheckpointError(
                f"{path}: Lightning checkpoint without hyper_parameters['unet'] (keys {sorted(hp)[:8]})"
            )
        stored = _stored_config(hp["unet"], path)
        weights = {
            k[len(_LIGHTNING_PREFIX) :]: v
            for k, v in obj["state_dict"].items()
            if k.startswith(_LIGHTNING_PREFIX)
        }
        if not weights:
            raise CheckpointError(
                f"{path}: Lightning checkpoint has no weights under the prefix {_LIGHTNING_PREFIX!r}"
            )
        return _reconcile(stored, preset, path), weights, dict(hp.get("diffusion") or {})
    if preset is None:
        guess = preset_for_filename(path)
        suggestion = (
            f"this looks like the released {Path(path).name}: use preset={guess!r}"
            if guess
            else f"known presets: {', '.join(sorted(PRESETS))}"
        )
        raise CheckpointError(
            f"{path} is a plain guided-diffusion state dict, which does not record its architecture; "
            f"pass preset=<name>, flags=<its README flags> or a UNetConfig ({suggestion})"
        )
    return _resolve_preset(preset), obj, {}


def load_model(
    path: PathLike,
    preset: str | UNetConfig | None = None,
    map_location: str | torch.device = "cpu",
    flags: str | Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load any supported checkpoint into a UNet (float32) in eval mode.

    A plain state dict needs ``preset`` (a preset name or a UNetConfig) or ``flags`` (the
    guided-diffusion flags of its README, a string or dict); a self-describing file must
    agree with them when given. ``.diffusion`` comes from ``flags``, else from the file,
    else from the preset's flags.
    """
    if flags is not None and preset is not None:
        raise CheckpointError("give either a preset or guided-diffusion flags, not both")
    obj = load_state_dict_file(path, map_location=map_location)
    kind = _classify(obj, path)
    wanted = UNetConfig.from_guided_diffusion_flags(flags) if flags is not None else preset
    config, weights, diffusion = _unpack(obj, kind, wanted, path)
    if flags is not None or (kind == "plain" and isinstance(preset, str)):
        diffusion = diffusion_settings(flags if flags is not None else PRESET_FLAGS[preset])
    weights = check_state_dict(weights, config, source=path)
    # float32 (released use_fp16 files are float32 too) and contiguous (channels_last runs)
    weights = {k: v.float().contiguous() if v.is_floating_point() else v for k, v in weights.items()}
    model = build_unet(config, device="meta")  # no init: every tensor comes from the file
    model.load_state_dict(weights, strict=True, assign=True)
    return LoadedModel(model.eval(), config, diffusion, sha256_file(path), kind)

"""Checkpoint I/O: the official plain state dicts, our self-describing files, Lightning .ckpt.

Three kinds of file load through :func:`load_model` (every load ``weights_only=True``, every save atomic):

- ``"plain"``: a guided-diffusion state dict (the released guided-diffusion / ILVR / P2 ``.pt``
  files). It does not describe itself: a preset name or the README's flag string gives the UNet
  and the diffusion (a bare :class:`UNetConfig` the UNet only).
- ``"ilvr_toolkit"``: ``{"format": "ilvr_toolkit.model/1", "unet": {...}, "diffusion": {...},
  "state_dict": {...}, "extra": {...}}`` written by :func:`save_model_file`.
- ``"lightning"``: ``hyper_parameters`` hold ``unet`` (a UNetConfig dict) and ``diffusion``;
  the UNet weights are ``state_dict`` entries under ``model.``.
"""

import functools
import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cli import UsageError
from ..fileio import atomic_open
from ..flags import diffusion_settings
from .config import PRESET_FLAGS, PRESETS, UNetConfig, get_preset, preset_for_filename
from .unet import UNetModel, build_unet

MODEL_FORMAT = "ilvr_toolkit.model/1"

PathLike = str | os.PathLike[str]
StateDict = Mapping[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the architecture it is loaded into."""


class ArchitectureMismatch(CheckpointError):
    """An intact checkpoint whose architecture is not the one given (a preset, flags, a config)."""


class ArchitectureNotGiven(CheckpointError):
    """A plain state dict loaded without a preset, flags or config; ``guess``: the preset its
    released file name suggests, or None."""

    def __init__(self, message: str, guess: str | None) -> None:
        super().__init__(message)
        self.guess = guess


@dataclass
class LoadedModel:
    """A network ready for inference and what is known about it."""

    model: UNetModel
    unet_config: UNetConfig
    diffusion: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    source_kind: str = "plain"  # "plain" | "ilvr_toolkit" | "lightning"


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file (``hashlib.file_digest`` reads it in chunks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_checkpoint_file(path: PathLike) -> None:
    """Refuse, with a :class:`CheckpointError` naming the file, one that is not an intact PyTorch
    checkpoint: neither a zip archive nor a legacy pickle, truncated, or holding a member whose
    CRC32 fails (torch.load checks none: changed tensor bytes load as wrong weights). One read of
    the file (0.2-0.5 s per 500 MB here), once per process for each version (inode, size, mtime)."""
    stat = os.stat(path)
    _check_once(os.fspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


#: the magic number that torch.save pickled first before PyTorch 1.6 (the legacy format)
_LEGACY = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:-1]


@functools.lru_cache(maxsize=64)  # remembers successes only: a refusal raises
def _check_once(path: str, inode: int, size: int, mtime_ns: int) -> None:
    with open(path, "rb") as f:
        head = f.read(32)
    if head[:1] == b"\x80" and _LEGACY in head:
        return  # the legacy format has no checksums
    alien = f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy pickle)"
    try:
        with zipfile.ZipFile(path) as archive:
            names, bad = archive.namelist(), archive.testzip()  # bad: the first member whose CRC32 fails
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as err:
        if head and not head.startswith(b"PK\x03\x04"):
            raise CheckpointError(alien) from None
        raise CheckpointError(f"{path} ({size} bytes) is truncated or corrupted ({err})") from None
    if not any(name.endswith("/data.pkl") for name in names):  # another zip file
        raise CheckpointError(alien)
    if bad is not None:
        raise CheckpointError(f"{path} is corrupted: its member {bad} fails its CRC32 check")


#: torch.load's environment switches; both set, it refuses every file (not the file's fault)
_FORCE_LOAD = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


def load_state_dict_file(path: PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` -> the stored object (an official file: the plain
    state dict), after :func:`check_checkpoint_file`; ``mmap``: tensors stay on disk until used (a
    cheap look at a zip checkpoint's contents). FileNotFoundError for a missing file,
    CheckpointError naming the problem for an unreadable one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    check_checkpoint_file(path)
    if all(os.environ.get(name, "0").lower() in ("1", "y", "yes", "true") for name in _FORCE_LOAD):
        raise UsageError(
            f"environment: {' and '.join(_FORCE_LOAD)} are both set; torch.load accepts one: unset one"
        )
    try:  # the legacy (pre-1.6, non-zip) format cannot be memory-mapped: it is read whole
        return torch.load(
            path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
        )
    except Exception as err:  # UnpicklingError, zip errors (RuntimeError), EOFError, KeyError on garbage ...
        if isinstance(err, OSError):
            raise
        try:  # the file is intact but map_location is no device here: name it, not the file
            torch.empty(0, device=map_location if isinstance(map_location, str | torch.device) else "cpu")
        except Exception as bad:
            said = " ".join(str(bad).split(". ")[0].split())[:200]
            raise ValueError(
                f"map_location {map_location!r}: no such device on this machine ({said})"
            ) from None
        said = f"truncated or corrupted? torch.load said {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
            said = "it holds Python objects, which weights_only=True refuses (no code ran); keep tensors only"
        size = path.stat().st_size
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({size} bytes): {said}") from err


def _plain_tensors(state_dict: StateDict | nn.Module) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies, without a DDP ``module.`` prefix."""
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    return _strip_ddp({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})


def _require_plain(obj: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(obj, list | tuple | dict):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} is not a str/int")
            _require_plain(v, f"{where}[{k!r}]")
    elif not (obj is None or isinstance(obj, str | int | float | bool | torch.Tensor)):
        raise TypeError(f"{where} is a {type(obj).__name__}, which torch.load(weights_only=True) refuses")


def save_model_file(
    path: PathLike,
    unet_config: UNetConfig,
    state_dict: StateDict | nn.Module,
    diffusion: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a self-describing model file (config + weights) atomically.

    The weights are checked against ``unet_config`` first, so the file never lies; ``diffusion``'s
    keys must be ``DiffusionConfig`` fields (those :func:`diffusion_settings` gives), which loaders read.
    """
    fields = sorted(diffusion_settings({}))
    if unknown := sorted(set(diffusion or {}) - set(fields)):
        raise ValueError(f"diffusion: unknown settings {unknown}; expected DiffusionConfig fields {fields}")
    weights = check_state_dict(_plain_tensors(state_dict), unet_config)
    payload = {"format": MODEL_FORMAT, "unet": unet_config.to_dict(), "diffusion": dict(diffusion or {})}
    payload.update(state_dict=weights, extra=dict(extra or {}))
    _require_plain(payload, "model file")
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)


def save_plain_state_dict(path: PathLike, state_dict: StateDict | nn.Module) -> None:
    """Write a bare guided-diffusion state dict atomically (loadable by the official code)."""
    with atomic_open(path, "wb") as handle:
        torch.save(_plain_tensors(state_dict), handle)


def _strip_ddp(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.`` prefix when every key has it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return dict(state_dict)


_OUTPUT_BLOCK = re.compile(r"output_blocks\.(\d+)\.")


def infer_architecture(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Read what a state dict's keys and shapes (``{key: shape}``) reveal about the architecture.

    Returns keys among ``out_channels, in_channels, num_classes, num_channels,
    use_scale_shift_norm, num_res_blocks, channel_mult, attention_ds, resblock_updown`` (those
    that could be inferred; ``attention_ds``: downsample rates). Head counts and attention order
    leave no trace.
    """

    def dim(key: str, i: int) -> int | None:
        return shapes[key][i] if key in shapes else None

    info: dict[str, Any] = {
        "out_channels": dim("out.2.weight", 0),
        "in_channels": dim("input_blocks.0.0.weight", 1),
        "num_classes": dim("label_emb.weight", 0),
        "num_channels": dim("time_embed.0.weight", 1),
    }
    emb, conv = dim("middle_block.0.emb_layers.1.weight", 0), dim("middle_block.0.out_layers.3.weight", 0)
    if emb and conv:
        info["use_scale_shift_norm"] = emb == 2 * conv
    info.update(_decoder_layout(shapes, info["num_channels"]))
    return {k: v for k, v in info.items() if v is not None or k == "num_classes"}


def _decoder_layout(shapes: Mapping[str, tuple[int, ...]], num_channels: int | None) -> dict[str, Any]:
    """``num_res_blocks, channel_mult, attention_ds, resblock_updown`` read from the output blocks."""

    def has(i: int, child: str) -> bool:  # child 0 of a block is a ResBlock; 1 may be attention
        return any(re.match(rf"output_blocks\.{i}\.{child}\.", key) for key in shapes)

    n = 1 + max((int(m[1]) for m in map(_OUTPUT_BLOCK.match, shapes) if m), default=-1)
    ups = [i for i in range(n) if has(i, r"[1-9]\.(conv|in_layers)")]  # Upsample or an up ResBlock
    per_level = ups[0] + 1 if ups else n  # num_res_blocks + 1 blocks per level
    if not n or n % per_level:
        return {}
    levels = n // per_level
    attention = {2 ** (levels - 1 - i // per_level) for i in range(n) if has(i, r"1\.qkv")}
    info: dict[str, Any] = {"num_res_blocks": per_level - 1, "attention_ds": tuple(sorted(attention))}
    if ups:
        info["resblock_updown"] = has(ups[0], r"[1-9]\.in_layers")
    width = "output_blocks.{}.0.out_layers.3.weight"  # each level's first decoder ResBlock
    widths = [shapes.get(width.format(i), (None,))[0] for i in range(0, n, per_level)]
    if num_channels and None not in widths:
        mult = (w // num_channels if w % num_channels == 0 else w / num_channels for w in reversed(widths))
        info["channel_mult"] = tuple(mult)
    return info


#: What the weights reveal (``infer_architecture``) -> the setting a user would change, where
#: its name differs from the key.
_SETTINGS = {
    "out_channels": "learn_sigma (6 output channels: learn_sigma True, 3: False)",
    "num_classes": "num_classes (class_cond: a label_emb table)",
    "channel_mult": "channel_mult (an empty one follows image_size, so check image_size too)",
    "attention_ds": "attention_resolutions (attention sits where image_size // resolution is the downsample rate)",
}


def _diagnose(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Name the settings that explain a mismatch between weights (``shapes``) and the config's."""
    found, mine = infer_architecture(shapes), infer_architecture(expected)
    return [
        f"{_SETTINGS.get(key, key)}: the checkpoint has {key} {value!r}, the config {mine[key]!r}"
        for key, value in found.items()
        if key in mine and value != mine[key]
    ]


def _mismatch_summary(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str:
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    groups = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
    return "; ".join(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})" for label, keys in groups if keys)


def check_state_dict(
    state_dict: StateDict, config: UNetConfig, source: PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Check that ``state_dict`` fits the model ``config`` builds; return it cleaned.

    A DDP ``module.`` prefix is stripped. On any mismatch one CheckpointError names the
    likely wrong setting(s) (learn_sigma, channel_mult, image_size, ...), not every key.
    ``source`` (a file name) adds a hint when it is a known released checkpoint.
    """
    if not (
        isinstance(state_dict, Mapping) and all(isinstance(v, torch.Tensor) for v in state_dict.values())
    ):
        raise CheckpointError(f"{source or 'the object'} is not a state dict (a mapping of names to tensors)")
    cleaned = _strip_ddp(state_dict)
    shapes = {k: tuple(v.shape) for k, v in cleaned.items()}
    expected = {k: tuple(v.shape) for k, v in build_unet(config, device="meta").state_dict().items()}
    if shapes == expected:
        return cleaned
    notes = _diagnose(shapes, expected) or ["the layout differs in a way no single setting explains"]
    lines = [f"checkpoint{f' {source}' if source else ''} does not fit the UNet config:"]
    lines += [f"  - {note}" for note in notes] + [f"  ({_mismatch_summary(shapes, expected)})"]
    preset = preset_for_filename(source) if source is not None else None  # named like a released file?
    if preset is not None and get_preset(preset).architecture() == config.architecture():
        lines.append(
            f"  hint: named like a released checkpoint (preset {preset!r}) but not its layout: another model?"
        )
    elif preset is not None:
        lines.append(f"  hint: {Path(source).name} is a released checkpoint; load it with preset={preset!r}")
    raise ArchitectureMismatch("\n".join(lines))


def _contents(obj: Any, path: PathLike) -> tuple[str, Any, StateDict, dict[str, Any]]:
    """(kind, stored UNet config dict or None, weights, stored diffusion settings) of a loaded file."""
    if isinstance(obj, Mapping) and "format" in obj:
        if obj["format"] != MODEL_FORMAT:
            raise CheckpointError(f"{path}: model file format {obj['format']!r}, expected {MODEL_FORMAT!r}")
        return "ilvr_toolkit", obj["unet"], obj["state_dict"], dict(obj.get("diffusion") or {})
    if isinstance(obj, Mapping) and "state_dict" in obj and "hyper_parameters" in obj:
        hp = obj["hyper_parameters"]
        if "unet" not in hp:
            raise CheckpointError(
                f"{path}: Lightning checkpoint lacks hyper_parameters['unet'] ({sorted(hp)[:8]})"
            )
        weights = {k[6:]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        if not weights:
            raise CheckpointError(f"{path}: Lightning checkpoint has no weights under the prefix 'model.'")
        return "lightning", hp["unet"], weights, dict(hp.get("diffusion") or {})
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "plain", None, obj, {}
    top = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{path}: unrecognised checkpoint contents ({top}); expected a plain state dict, "
        f"an {MODEL_FORMAT} file or a Lightning checkpoint with hyper_parameters['unet']"
    )


def _config(stored: Any, preset: str | UNetConfig | None, path: PathLike, source: str = "") -> UNetConfig:
    """The config to build: the stored one (None for a plain state dict; checked against ``preset``
    if given), else the preset. A UNetConfig ``preset`` of the stored architecture wins (it may carry
    other runtime settings such as ``attention_backend``). ``source`` names where ``preset`` came
    from in a mismatch message (default: the preset's name, or "the given config")."""
    wanted = get_preset(preset) if isinstance(preset, str) else preset
    if stored is None and wanted is None:
        guess = preset_for_filename(path)
        suggestion = f"this looks like the released {Path(path).name}: use preset={guess!r}" if guess else ""
        suggestion = suggestion or f"known presets: {', '.join(sorted(PRESETS))}"
        raise ArchitectureNotGiven(
            f"{path} is a plain guided-diffusion state dict, which does not record its architecture; "
            f"pass preset=<name>, flags=<its README flags> or a UNetConfig ({suggestion})",
            guess,
        )
    if stored is None:
        return wanted
    try:
        stored = UNetConfig.from_dict(stored)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the stored UNet config is invalid: {err}") from err
    if wanted is None:
        return stored
    theirs = wanted.architecture()
    source = source or (f"preset {preset}" if isinstance(preset, str) else "the given config")
    differ = [f"{k}: file {v!r} vs {theirs[k]!r}" for k, v in stored.architecture().items() if theirs[k] != v]
    if differ:
        raise ArchitectureMismatch(
            f"{path} describes a different architecture than {source}: {', '.join(differ)}"
        )
    return wanted if isinstance(preset, UNetConfig) else stored


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
    kind, stored, weights, diffusion = _contents(load_state_dict_file(path, map_location=map_location), path)
    wanted = UNetConfig.from_guided_diffusion_flags(flags) if flags is not None else preset
    config = _config(stored, wanted, path, "the given flags" if flags is not None else "")
    if flags is not None or (kind == "plain" and isinstance(preset, str)):
        diffusion = diffusion_settings(flags if flags is not None else PRESET_FLAGS[preset])
    weights = check_state_dict(weights, config, source=path)
    # float32 (released use_fp16 files are float32 too) and contiguous (channels_last runs)
    weights = {k: v.float().contiguous() if v.is_floating_point() else v for k, v in weights.items()}
    model = build_unet(config, device="meta")  # no init: every tensor comes from the file
    model.load_state_dict(weights, strict=True, assign=True)
    return LoadedModel(model.eval(), config, diffusion, sha256_file(path), kind)

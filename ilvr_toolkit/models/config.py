"""Architecture settings of the ADM UNet (guided-diffusion's names) and named presets, so a checkpoint
that stores its config (ours) or a preset name (the official plain state dicts) loads without
re-typing flags. *Runtime* settings (``dropout``, ``use_checkpoint``, ``attention_backend``,
``native_groupnorm``, ``winograd``) never change the weights (:meth:`UNetConfig.architecture` leaves them out)."""

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..flags import checked_fields, parse_numbers, resolve_flags

#: guided-diffusion's channel multipliers when ``channel_mult`` is left empty.
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

ATTENTION_BACKENDS = ("sdpa", "math")
_RUNTIME = {"runtime": True}  # field metadata of the runtime settings


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of an ADM UNet, named as in guided-diffusion's ``create_model``.

    ``channel_mult`` left empty resolves to guided-diffusion's default for ``image_size``.
    ``attention_resolutions`` are feature-map sizes in pixels (e.g. ``(16,)``); the network
    places attention where ``image_size // ds`` is one of them (``ds`` = downsample rate).
    Tuple fields also accept lists or guided-diffusion strings such as ``"1,2,2,2"``.
    """

    image_size: int
    num_channels: int
    num_res_blocks: int
    in_channels: int = 3
    channel_mult: tuple[float, ...] = ()
    attention_resolutions: tuple[int, ...] = ()
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    learn_sigma: bool = False
    use_new_attention_order: bool = False
    num_classes: int | None = None
    dropout: float = field(default=0.0, metadata=_RUNTIME)
    use_checkpoint: bool = field(default=False, metadata=_RUNTIME)
    attention_backend: str = field(default="sdpa", metadata=_RUNTIME)
    native_groupnorm: bool = field(default=False, metadata=_RUNTIME)
    winograd: bool = field(default=False, metadata=_RUNTIME)

    def __post_init__(self) -> None:
        for f in fields(self):  # a truthy string ("maybe") would turn a setting on
            if f.type is bool and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} {getattr(self, f.name)}: expected true or false")
        for name in ("image_size", "num_channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        mult = parse_numbers(self.channel_mult, "channel_mult") or DEFAULT_CHANNEL_MULT.get(self.image_size)
        if not mult:
            sizes = sorted(DEFAULT_CHANNEL_MULT)
            raise ValueError(
                f"set channel_mult: image_size {self.image_size} has no default (only {sizes} have)"
            )
        if min(mult) <= 0:
            raise ValueError(f"channel_mult entries must be > 0, got {mult}")
        attn = tuple(int(r) for r in parse_numbers(self.attention_resolutions, "attention_resolutions"))
        object.__setattr__(self, "channel_mult", mult)
        object.__setattr__(self, "attention_resolutions", attn)
        levels = len(mult)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**{levels - 1} (channel_mult has {levels} levels)"
            )
        for res in self.attention_resolutions:
            if res <= 0 or self.image_size % res:
                raise ValueError(f"attention resolution {res} does not divide image_size {self.image_size}")
        if self.num_head_channels == -1 and self.num_heads < 1:
            raise ValueError("num_heads must be >= 1 when num_head_channels is -1")
        for name in ("num_head_channels", "num_heads_upsample"):
            if getattr(self, name) != -1 and getattr(self, name) < 1:
                raise ValueError(f"{name} must be -1 (unset) or >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError("num_classes must be a positive int or None")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, not {self.attention_backend!r}"
            )

    @property
    def out_channels(self) -> int:
        """3 (eps) or 6 (eps, then the variance interpolation value v) with ``learn_sigma``."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """Downsample rates at which attention sits: ``image_size // resolution``."""
        return tuple(self.image_size // res for res in self.attention_resolutions)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.num_channels

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON/YAML friendly) dict; :meth:`from_dict` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        return cls(**checked_fields(cls, d, "UNetConfig"))

    @classmethod
    def from_guided_diffusion_flags(cls, flags: str | Mapping[str, Any]) -> "UNetConfig":
        """From guided-diffusion flags: a README string (``"--image_size 64 ..."``, see
        :func:`~ilvr_toolkit.models.parse_flags`) or a dict. Flags left out take the scripts'
        defaults; ``class_cond True`` means 1000 classes. Diffusion, sampling and ``use_fp16`` flags
        are ignored (the released files store float32 weights; precision is chosen at sampling)."""
        given = resolve_flags(flags)  # every flag; those named like a field set that field
        same = {f.name: given[f.name] for f in fields(cls) if f.name in given}
        return cls(**same, num_classes=1000 if given["class_cond"] else None)

    def architecture(self) -> dict[str, Any]:
        """The settings that shape the weights (runtime settings left out)."""
        runtime = {f.name for f in fields(self) if f.metadata.get("runtime")}
        return {k: v for k, v in self.to_dict().items() if k not in runtime}

    def replace(self, **changes: Any) -> "UNetConfig":
        """A copy with some fields changed (checked again)."""
        return replace(self, **changes)


# Every preset is the flag string of its README, so nobody re-types flags; the diffusion of a
# plain released file comes from the same string (checkpoint.load_model).
_ADM256_NAMES = ("ffhq", "afhq_dog", "metfaces", "celebahq", "cub", "flowers")
_ADM256 = (  # the released ILVR / P2-weighting 256x256 checkpoints (ilvr_adm and P2 READMEs)
    "--attention_resolutions 16 --class_cond False --diffusion_steps 1000 --dropout 0.0 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 128 --num_head_channels 64 "
    "--num_res_blocks 1 --resblock_updown True --use_fp16 False --use_scale_shift_norm True"
)
_LSUN = (  # guided-diffusion's README, as every string below (shared/reference/guided_diffusion)
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
    "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)
_IMAGENET256 = (
    "--attention_resolutions 32,16,8 --class_cond {} --diffusion_steps 1000 --image_size {} --learn_sigma True "
    "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 {} --use_scale_shift_norm True"
)
_TINY = "--learn_sigma True --num_res_blocks 1 --num_channels 32 --image_size "

PRESET_FLAGS: dict[str, str] = {
    **dict.fromkeys(("adm256", *_ADM256_NAMES), _ADM256),
    "imagenet64_cond": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
    "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 "
    "--num_res_blocks 3 --resblock_updown True --use_new_attention_order True --use_fp16 True "
    "--use_scale_shift_norm True",
    "imagenet128_cond": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
    "--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "imagenet256_cond": _IMAGENET256.format("True", 256, "True"),
    "imagenet256_uncond": _IMAGENET256.format("False", 256, "True"),
    "imagenet512_cond": _IMAGENET256.format("True", 512, "False"),
    **dict.fromkeys(("lsun_bedroom", "lsun_cat", "lsun_horse"), _LSUN),
    "lsun_horse_nodropout": _LSUN.replace("--dropout 0.1", "--dropout 0.0"),
    # the reference fixture (tests/fixtures/reference/manifest_tiny32.json)
    "tiny32": _TINY + "32 --channel_mult 1,2,2,2 --attention_resolutions 16 --num_heads 4",
    # small configs for tests and smoke runs (a CPU forward takes milliseconds)
    "tiny": _TINY + "32 --channel_mult 1,2 --attention_resolutions 16 --num_heads 2",
    "tiny16": _TINY + "16 --channel_mult 1,2 --attention_resolutions 8 --num_heads 1 --num_head_channels 32 "
    "--resblock_updown True",
}

PRESETS: dict[str, UNetConfig] = {
    name: UNetConfig.from_guided_diffusion_flags(f) for name, f in PRESET_FLAGS.items()
}

#: Released checkpoint filenames -> preset (for hints when a plain state dict is loaded).
RELEASED_CHECKPOINTS: dict[str, str] = {
    **{f"{name}_{kind}.pt": name for name in _ADM256_NAMES for kind in ("p2", "baseline")},
    **dict.fromkeys(("afhq_dog_4m.pt", "afhqdog_p2.pt", "afhqdog_baseline.pt"), "afhq_dog"),
    **dict.fromkeys(("flower_p2.pt", "flower_baseline.pt"), "flowers"),  # P2's release names
    "ffhq_10m.pt": "ffhq",
    **{f"{s}x{s}_diffusion.pt": f"imagenet{s}_cond" for s in (64, 128, 256, 512)},
    "256x256_diffusion_uncond.pt": "imagenet256_uncond",
    **{f"{name}.pt": name for name in ("lsun_bedroom", "lsun_cat", "lsun_horse", "lsun_horse_nodropout")},
}


def get_preset(name: str) -> "UNetConfig":
    """The preset config called ``name`` (configs are frozen, so sharing is safe)."""
    if name not in PRESETS:
        raise KeyError(f"unknown UNet preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def preset_for_filename(path: str | os.PathLike[str]) -> str | None:
    """The preset of a released checkpoint, judged by its file name (None if unknown)."""
    return RELEASED_CHECKPOINTS.get(os.path.basename(os.fspath(path)).lower())

"""guided-diffusion's script flags as its README prints them (``MODEL_FLAGS="--image_size 64 ..."``):
a released guided-diffusion / ILVR / P2 file is a bare state dict, and these flags rebuild its network
and diffusion. Flags left out take the scripts' defaults (``model_and_diffusion_defaults()``)."""

import dataclasses
import difflib
import re
import shlex
from collections.abc import Mapping
from typing import Any

#: ``model_and_diffusion_defaults()`` of guided-diffusion's ``script_util.py``.
GUIDED_DIFFUSION_DEFAULTS: dict[str, Any] = {
    **dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1),
    **dict(num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0),
    **dict(class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False),
    **dict(use_fp16=False, use_new_attention_order=False, learn_sigma=False, diffusion_steps=1000),
    **dict(noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False),
    **dict(rescale_timesteps=False, rescale_learned_sigmas=False),
}

#: Other flags their READMEs print: ``create_gaussian_diffusion``'s ``sigma_small``, P2
#: weighting's ``p2_gamma``/``p2_k``, the sampling scripts' (guided-diffusion, ILVR).
#: ``sigma_small``, ``p2_*`` and ``clip_denoised`` go into the diffusion settings; the others
#: are accepted and ignored (sample.py has its own options: ``--sampler.method ddim``...).
OTHER_FLAGS: dict[str, Any] = {
    **dict(sigma_small=False, p2_gamma=0.0, p2_k=1.0, clip_denoised=True, use_ddim=False, num_samples=10000),
    **dict(batch_size=16, model_path="", down_N=32, range_t=0, base_samples="", save_dir=""),
}

_KNOWN = {**GUIDED_DIFFUSION_DEFAULTS, **OTHER_FLAGS}
_LISTS = ("attention_resolutions", "channel_mult")
_TRUE, _FALSE = ("1", "true", "yes", "y", "t"), ("0", "false", "no", "n", "f", "")


def checked_fields(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls``; an unknown key is a ValueError naming
    it and the closest known key (else the known keys)."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    if unknown := sorted(set(data) - set(known), key=str):
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
        raise ValueError(
            f"unknown {what} key{'s' * (len(unknown) > 1)} {', '.join(map(str, unknown))} ({hint})"
        )
    return dict(data)


def parse_numbers(value: Any, name: str) -> tuple[float, ...]:
    """``"1,2,2,2"`` / ``[1, 2]`` / ``16`` / ``""`` -> tuple of ints (floats where fractional)."""
    items = [s for s in value.replace(" ", "").split(",") if s] if isinstance(value, str) else value
    out = []
    for item in [items] if isinstance(items, int | float) else items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: cannot read {item!r} as a number (from {value!r})") from None
        out.append(int(number) if number.is_integer() else number)
    return tuple(out)


def to_bool(value: Any, name: str = "value") -> bool:
    """guided-diffusion's ``str2bool``: yes/true/t/y/1 and no/false/f/n/0 (any case)."""
    word = value.strip().lower() if isinstance(value, str) else None
    if word is not None and word not in _TRUE + _FALSE:
        raise ValueError(f"{name}: cannot read {value!r} as a boolean (True/False)")
    return word in _TRUE if word is not None else bool(value)


def _typed(name: str, value: Any) -> Any:
    """``value`` converted to the type of the flag's default (lists: tuples of numbers)."""
    if name not in _KNOWN:
        close = difflib.get_close_matches(name, _KNOWN, n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        raise ValueError(f"unknown guided-diffusion flag --{name}{hint}")
    default = _KNOWN[name]
    if name in _LISTS:
        return parse_numbers(value, f"--{name}")
    if isinstance(default, bool):
        return to_bool(value, f"--{name}")
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name}: expected {type(default).__name__}, got {value!r}") from None


def parse_flags(text: str) -> dict[str, Any]:
    """Typed values of the flags given in ``text`` (``--flag value``, ``--flag=value``, inside shell
    assignments ``NAME="..."`` or not): ``parse_flags('MODEL_FLAGS="--image_size 64 --class_cond True"')``
    is ``{"image_size": 64, "class_cond": True}``. ValueError for an unknown flag (naming the closest
    known one), a flag without a value, or a value of the wrong type."""
    tokens: list[str] = []
    for token in shlex.split(text):
        assignment = re.fullmatch(r"[A-Za-z_]\w*=(.*)", token, re.S)  # NAME="--flag value ..."
        for part in shlex.split(assignment.group(1)) if assignment else [token]:
            tokens += part.split("=", 1) if part.startswith("--") else [part]
    flags: dict[str, Any] = {}
    for i in range(0, len(tokens), 2):
        if not tokens[i].startswith("--"):
            raise ValueError(f"expected a --flag, got {tokens[i]!r} in {text!r}")
        if i + 1 == len(tokens):
            raise ValueError(f"flag {tokens[i]} has no value")
        flags[tokens[i][2:]] = _typed(tokens[i][2:], tokens[i + 1])
    return flags


def resolve_flags(flags: str | Mapping[str, Any]) -> dict[str, Any]:
    """Every known flag, typed: those of ``flags`` (a string or a dict) over the defaults."""
    given = parse_flags(flags) if isinstance(flags, str) else {k: _typed(k, v) for k, v in flags.items()}
    return {**{k: _typed(k, v) for k, v in _KNOWN.items()}, **given}


def diffusion_settings(flags: str | Mapping[str, Any]) -> dict[str, Any]:
    """The ``DiffusionConfig`` fields that ``flags`` describe (as guided-diffusion's
    ``create_gaussian_diffusion`` reads them)."""
    f = resolve_flags(flags)
    same = ("noise_schedule", "learn_sigma", "sigma_small", "use_kl", "predict_xstart", "rescale_timesteps")
    same += ("rescale_learned_sigmas", "timestep_respacing", "p2_gamma", "p2_k", "clip_denoised")
    return {"steps": f["diffusion_steps"], **{k: f[k] for k in same}}

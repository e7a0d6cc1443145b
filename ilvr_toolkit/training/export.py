"""Export a training checkpoint's weights for sampling (``train.py export CKPT`` or
``python -m ilvr_toolkit.training.export CKPT``), atomically: ``DIR/NAME.pt``, a plain
guided-diffusion state dict (the official code with its flags, ``sample.py`` with a preset), and
``DIR/NAME.model.pt``, our self-describing model file (``models.load_model``, no flags). Defaults:
``DIR`` = ``RUN/export``, ``NAME`` = ``{weights}_step{global_step:08d}``, weights ``ema`` (the
checkpoint's ``state_dict``; ``raw`` is ``current_model_state``, the weights being trained)."""

from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ArgumentParser

from ilvr_toolkit.cli import UsageError, file_in_the_way, make_parser, normalize_options, run_command
from ilvr_toolkit.models import (
    UNetConfig,
    check_state_dict,
    load_state_dict_file,
    save_model_file,
    save_plain_state_dict,
)

_PREFIX = "model."


def checkpoint_unet_weights(checkpoint: dict[str, Any], weights: str = "ema") -> dict[str, torch.Tensor]:
    """The UNet's ``"ema"`` or ``"raw"`` weights in a :class:`DiffusionModule` checkpoint, without the
    ``"model."`` prefix (a checkpoint trained without EMA has raw weights only)."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    has_ema = "current_model_state" in checkpoint
    if weights == "ema" and not has_ema:
        raise ValueError("no EMA weights in this checkpoint (trained without EMA): use --weights raw")
    source = checkpoint["current_model_state"] if weights == "raw" and has_ema else checkpoint["state_dict"]
    unet = {k.removeprefix(_PREFIX): v for k, v in source.items() if k.startswith(_PREFIX)}
    if not unet:
        raise ValueError(f"no UNet weights under the prefix {_PREFIX!r} in the checkpoint")
    return unet


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path | None = None,
    name: str | None = None,
    weights: str = "ema",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``NAME.pt`` (plain) and ``NAME.model.pt`` (self-describing); see the module doc. Files
    already there are kept (:class:`UsageError`) unless ``overwrite``.

    Returns ``{"plain": Path, "model_file": Path, "weights": "ema"|"raw", "global_step": int}``.
    """
    ckpt_path = Path(ckpt_path)
    checkpoint = load_state_dict_file(ckpt_path)  # weights_only=True
    hparams = checkpoint.get("hyper_parameters") or {}
    if "unet" not in hparams:
        raise ValueError(f"{ckpt_path}: not a DiffusionModule checkpoint (no hyper_parameters['unet'])")
    # native_groupnorm, winograd: per-run speed choices (sample.py --native_groupnorm), not the model's
    unet_config = UNetConfig.from_dict(hparams["unet"]).replace(native_groupnorm=False, winograd=False)
    state = check_state_dict(checkpoint_unet_weights(checkpoint, weights), unet_config, source=ckpt_path)
    step = int(checkpoint.get("global_step", 0))
    if out_dir is None:
        run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
        out_dir = run_dir / "export"
    out_dir = Path(out_dir)
    if file := file_in_the_way(out_dir):
        raise UsageError(f"--output.dir {out_dir}: {file} is a file, expected a folder (made if missing)")
    name = name or f"{weights}_step{step:08d}"
    info = dict(checkpoint.get("ilvr_toolkit") or {})
    extra = {"weights": weights, "global_step": step, "epoch": int(checkpoint.get("epoch", 0))}
    extra.update(source_checkpoint=str(ckpt_path), ema=info.get("ema"), init_from=info.get("init_from"))
    extra["trained_with"] = info.get("version")
    plain, model_file = out_dir / f"{name}.pt", out_dir / f"{name}.model.pt"
    for there in (f for f in (plain, model_file) if f.exists() and not overwrite):
        raise UsageError(f"--name {name}: {there} exists; choose another --name or pass --overwrite")
    partial = [out_dir / f"{f.name}.partial" for f in (plain, model_file)]
    try:  # both files or neither (a full disk); an earlier pair (--overwrite) stays until both are written
        save_plain_state_dict(partial[0], state)
        save_model_file(partial[1], unet_config, state, dict(hparams.get("diffusion") or {}), extra)
        for written, final in zip(partial, (plain, model_file), strict=True):
            written.replace(final)
    finally:
        for written in partial:
            written.unlink(missing_ok=True)
    return {"plain": plain, "model_file": model_file, "weights": weights, "global_step": step}


def build_parser() -> ArgumentParser:
    parser = make_parser("train.py export", "Export a training checkpoint's EMA (or raw) UNet weights.")
    parser.add_argument(
        "checkpoint", type=str, help="a .ckpt of train.py (last.ckpt, step=N.ckpt, hpc_ckpt_K.ckpt)"
    )
    optional = {"type": str | None, "default": None}
    parser.add_argument("--output.dir", **optional, help="export folder (default: RUN/export)")
    parser.add_argument("--name", **optional, help="file stem (default: {weights}_step{N})")
    parser.add_argument("--weights", type=Literal["ema", "raw"], default="ema", help="which weights")
    parser.add_argument(
        "--overwrite", type=bool, default=False, help="replace NAME.pt / NAME.model.pt if there"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``train.py export`` (``--out_dir`` is the old spelling of ``--output.dir``)."""
    return run_command("train.py export", _main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(normalize_options(argv, parser, aliases={"--out_dir": "--output.dir"}))
    if not Path(args.checkpoint).is_file():
        raise UsageError(f"checkpoint {args.checkpoint}: no such file")
    result = export_checkpoint(args.checkpoint, args.output.dir, args.name, args.weights, args.overwrite)
    print(f"{result['weights']} weights of step {result['global_step']}:")
    print(f"  plain state dict : {result['plain']}")
    print(f"  model file       : {result['model_file']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

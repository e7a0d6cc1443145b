"""Settings of a translation run (``sample.py``), as nested dataclasses for jsonargparse; each
checks its values when it is made: a bad value is a ``UsageError`` naming the option, before
anything is loaded."""

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ..cli import UsageError, check_range
from ..diffusion.respace import parse_respacing

__all__ = ["ModelSpec", "ILVRSpec", "SDEditSpec", "SamplerSpec", "OutputSpec", "SampleConfig"]

#: SampleConfig's integer options and their least value (checked in this order).
_MINIMA = {
    "num_samples": 1,
    "samples_per_reference": 1,
    "batch_size": 1,
    "workers": 0,
    "num_shards": 1,
    "seed": 0,
}


@dataclass
class ModelSpec:
    """Which network to sample.

    Attributes:
        checkpoint: one of our checkpoints (``.ckpt`` from train.py or an exported file; the
            configuration is read from it) or a released plain state dict (``ffhq_10m.pt``).
        preset: the preset of a plain state dict (``ffhq``, ``imagenet64_cond``, ...).
        flags: instead of preset, the guided-diffusion flags of its README (``"--image_size
            64 --class_cond True ..."``); the network and the diffusion follow them.
    """

    checkpoint: str = ""
    preset: str | None = None
    flags: str | None = None


@dataclass
class ILVRSpec:
    """ILVR conditioning; its factor, range and mode serve every task (``--task``).

    Attributes:
        factor: the down-sampling factor N of phi_N; a list runs every N (outputs
            ``<stem>_N<N>_s<k>.png``). Larger N keeps only coarse layout and colour.
        range_t: steps with respaced index > range_t are conditioned (the official
            ``range_t``; 0 = all but the last step, -1 = all). None: 0 for ``ilvr``, -1 (the
            last step too, so P(x_0) = P(y)) for the other tasks.
        fraction: instead of range_t, the share of steps conditioned counted from x_T
            (round(fraction * steps) of them, a tie to the even count: 0.29 of 10 is 3).
        stop_timestep: instead of range_t, an original timestep: condition while t > it.
        mode: ``paper`` (reference at the level of the step's output, y_{t-1}) or
            ``official`` (level of the step's input, as the released code; ilvr_adm #13).
    """

    factor: int | list[int] = 4
    range_t: int | None = None
    fraction: float | None = None
    stop_timestep: int | None = None
    mode: Literal["paper", "official"] = "paper"

    def __post_init__(self) -> None:
        if not self.factors:
            raise UsageError("--ilvr.factor []: expected at least one factor N")
        for i, factor in enumerate(self.factors):
            check_range("ilvr.factor", factor, 1)
            if factor in self.factors[:i]:
                raise UsageError(
                    f"--ilvr.factor {self.factor}: {factor} given twice; expected distinct factors N"
                )
        given = [k for k in ("range_t", "fraction", "stop_timestep") if getattr(self, k) is not None]
        if len(given) > 1:
            raise UsageError(f"--ilvr.{given[0]} and --ilvr.{given[1]}: give at most one of them")
        for name, low, high in (("range_t", -1, None), ("fraction", 0.0, 1.0), ("stop_timestep", 0, None)):
            if getattr(self, name) is not None:
                check_range(f"ilvr.{name}", getattr(self, name), low, high)

    @property
    def factors(self) -> list[int]:
        return list(self.factor) if isinstance(self.factor, list) else [int(self.factor)]


@dataclass
class SDEditSpec:
    """SDEdit start (Meng et al. 2022): begin at respaced index k from the reference diffused to k
    (with the draw x_T would have used) instead of from x_T.

    Attributes:
        strength: in (0, 1]: k = max(round(strength * steps), 1) - 1; 1 = the full run from x_T.
        start_index: instead of strength, k itself (steps - 1 = the full run).
    """

    strength: float | None = None
    start_index: int | None = None

    def __post_init__(self) -> None:
        if self.strength is not None and self.start_index is not None:
            raise UsageError("--sdedit.strength and --sdedit.start_index: give at most one of them")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise UsageError(f"--sdedit.strength {self.strength}: expected a number in (0, 1]")
        if self.start_index is not None:
            check_range("sdedit.start_index", self.start_index, 0)


@dataclass
class SamplerSpec:
    """The reverse process: ``ddpm`` (ancestral) or ``ddim`` (+ eta) over ``respacing`` steps.

    Attributes:
        method: ddpm (ancestral) or ddim.
        respacing: the steps kept, as guided-diffusion's timestep_respacing: "100" (100
            evenly spaced steps), "10,20,30" (counts per section), "ddim50", "" (all);
            None: the model's ``timestep_respacing`` flag if it has one, else "100".
        eta: DDIM noise in [0, 1] (0: deterministic, 1: DDPM's posterior variance).
    """

    method: Literal["ddpm", "ddim"] = "ddpm"
    respacing: str | int | None = None
    eta: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.respacing, int):  # ``respacing: 100`` in a YAML file
            self.respacing = str(self.respacing)
        try:  # the steps it keeps of the model's: checked once the model is loaded
            parse_respacing(self.respacing or "")
        except ValueError:
            raise UsageError(
                f"--sampler.respacing {self.respacing!r}: expected step counts such as 100, 10,20,30 or ddim50"
            ) from None
        check_range("sampler.eta", self.eta, 0.0, 1.0)  # > 1: sigma_t^2 > 1 - alpha_bar_{t-1}, NaN


@dataclass
class OutputSpec:
    """Where and what to write: PNGs ``<stem>_s<k>.png``, an optional grid, the manifest."""

    dir: str = "outputs/run"
    grid: bool = True
    grid_max_rows: int = 16

    def __post_init__(self) -> None:
        check_range("output.grid_max_rows", self.grid_max_rows, 1)
        if not str(self.dir).strip():
            raise UsageError("--output.dir: empty; expected a folder")


@dataclass
class SampleConfig:
    """A whole translation run. See README "Translating your own images".

    Attributes:
        references: folder of images (recursive, sorted; png/jpg/jpeg/webp) or an LMDB dataset.
        unconditional: sample without references (``num_samples`` images).
        num_samples: number of images in unconditional mode.
        task: the P of the step x <- x + P(y - x): ``ilvr`` phi_N, ``inpaint`` the mask, ``colorize``
            the channel mean, ``superres`` phi_N of y = up_N(reference read at image_size / N),
            ``local_edit`` the mask after phi_N (docs/conditioning.md).
        mask: inpaint, local_edit: a black-and-white PNG of the model's size, white = kept.
        sdedit: start from the reference diffused to an intermediate step (SDEdit).
        class_labels: class-conditional models only: one label for every image, a list (one
            per reference, in order) or a file of ``<reference name> <label>`` lines.
        samples_per_reference: outputs per reference (``<stem>_s0.png``, ``<stem>_s1.png``...).
        batch_size: images per forward pass (a last partial batch is fine).
        seed: run seed; each image's noise is seeded from (seed, reference index, sample).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``...
        precision: network precision under autocast (the diffusion math stays float32).
        channels_last: run the UNet in channels-last memory format.
        native_groupnorm: under bf16/fp16, run GroupNorm in that dtype (float32 statistics)
            instead of on float32 copies: 1.13-1.18x per bf16 ffhq forward on the CPU, within
            one rounding step of the float32 round trip (``docs/benchmarks.md``). No effect in fp32.
        winograd: fp32 on the CPU: the UNet's 3x3 convolutions by Winograd F(4x4, 3x3) (a C++
            kernel built on first use; needs a C++ compiler and ninja; ``models/winograd.py``):
            relative error about 2e-6 against float64. No effect under bf16/fp16 autocast.
        compile: ``torch.compile`` the UNet.
        cpu_malloc: on the CPU, ``tuned`` keeps freed tensor memory in the process during the
            run (no page faults per step: 2-20% per ffhq forward, same numbers; glibc's defaults
            are set back afterwards); ``default`` leaves glibc alone. ``sample.py`` defaults to
            ``tuned`` (``runtime.tune_process``), library callers opt in. Ignored off the CPU.
        workers: threads that decode the next batch's references and write the last
            batch's PNGs while a batch samples (0: one after another in the main thread;
            ``--io_workers`` is the old name).
        shard_index: this job's shard of the references (job arrays), 0-based.
        num_shards: number of shards the references are split into (contiguous ranges).
        evaluate_against: target-domain images (LMDB or folder) to compute FID/KID against.
        inception_weights: path of the FID Inception weights (else the torch hub cache).
        stats_cache_dir: where reference statistics are cached.
        progress: show a progress bar.
        published: published numbers (e.g. ``{fid: 74.37}``) printed next to ours; set by the
            protocol configs in ``configs/protocols/``.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    references: str | None = None
    unconditional: bool = False
    num_samples: int = 8
    task: Literal["ilvr", "inpaint", "colorize", "superres", "local_edit"] = "ilvr"
    mask: str | None = None
    ilvr: ILVRSpec = field(default_factory=ILVRSpec)
    sdedit: SDEditSpec = field(default_factory=SDEditSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    class_labels: int | list[int] | str | None = None
    samples_per_reference: int = 1
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    native_groupnorm: bool = False
    winograd: bool = False
    compile: bool = False
    cpu_malloc: Literal["tuned", "default"] = "default"
    workers: int = 4
    shard_index: int = 0
    num_shards: int = 1
    evaluate_against: str | None = None
    inception_weights: str | None = None
    stats_cache_dir: str | None = None
    progress: bool = True
    published: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name, low in _MINIMA.items():
            check_range(name, getattr(self, name), low)
        check_range("shard_index", self.shard_index, 0, self.num_shards - 1)
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UsageError(f"--device {self.device}: expected auto, cpu, cuda, cuda:N or mps")
        self._check_task()

    def _check_task(self) -> None:
        if (self.mask is None) == (self.task in ("inpaint", "local_edit")):
            need = "required" if self.mask is None else "not used"
            raise UsageError(f"--mask: {need} by --task {self.task}")
        sdedit = self.sdedit.strength is not None or self.sdedit.start_index is not None
        if (self.task != "ilvr" or sdedit) and (self.unconditional or not self.references):
            raise UsageError(f"--task {self.task}{' with --sdedit' * sdedit}: needs --references")
        if self.task == "superres" and len(self.ilvr.factors) > 1:
            raise UsageError(f"--ilvr.factor {self.ilvr.factor}: super-resolution takes one factor")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SampleConfig":
        """The inverse of :meth:`to_dict` (nested sections as dicts); unknown keys are ignored."""
        nested = {"model": ModelSpec, "ilvr": ILVRSpec, "sdedit": SDEditSpec, "sampler": SamplerSpec}
        nested["output"] = OutputSpec
        known = {f.name for f in fields(cls)}
        return cls(**{k: nested[k](**v) if k in nested else v for k, v in data.items() if k in known})

"""A translation run over a reference set: load, plan, sample in batches, write, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batchjob import StopSignals, leave_note, progress_bar
from ..cli import UsageError, file_in_the_way
from ..diffusion import DiffusionConfig, GaussianDiffusion, get_named_beta_schedule
from ..fileio import remove_dead_temps
from ..models import (
    PRESETS,
    ArchitectureMismatch,
    ArchitectureNotGiven,
    LoadedModel,
    UNetConfig,
    build_unet,
    get_preset,
    load_model,
    sha256_file,
)
from ..runtime import resolve_device, tuned_cpu_malloc
from .background import BackgroundIO
from .config import SampleConfig, SamplerSpec
from .distributed import barrier, finish, init_ranks
from .generate import Condition, generate, sampling_diffusion
from .grid import build_grid
from .labels import resolve_class_labels
from .manifest import (
    ManifestPart,
    check_reference_content,
    check_references_in_place,
    check_same_run,
    merge_manifest,
    versions,
)
from .plan import WorkItem, batches, shard_range
from .shards import fixed_shard_count, planned_items, run_summary
from .tasks import reference_set, run_factors, run_operators, task_setup
from .writer import save_png

__all__ = ["RunResult", "run", "resolve_device", "make_net"]
#: the parts ``sampling.merge`` shares (a sharded run's manifest and grid written as one process would)
__all__ += ["References", "check_model_options", "check_settings", "diffusion_for", "load", "summarize"]

log = logging.getLogger("ilvr_toolkit.sampling")

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: SIGUSR1/SIGTERM during a run: finish the batch, stop (the batch script requeues; see batchjob)
STOP = StopSignals()


@dataclass
class RunResult:
    """What a run did; ``manifest`` is set when this process wrote the run's manifest.json."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    skipped_existing: int = 0
    failed_references: dict[str, str] = field(default_factory=dict)
    manifest: Path | None = None
    grid: Path | None = None
    metrics: dict[str, Any] | None = None  # set by the evaluation (sample.py --evaluate_against)
    seconds: float = 0.0
    references: References | None = None  # the run's reference images (``get(index)``)


def make_net(model: torch.nn.Module, device: torch.device, precision: str, channels_last: bool) -> Callable:
    """``net(x, t, y=None)`` running ``model`` under the requested autocast; returns float32.
    A class-conditional model's labels ``y`` (B,) are bound per batch (``functools.partial``)."""
    dtype = _AUTOCAST[precision]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(x.contiguous(memory_format=memory_format), t, y).float()

    return net


def diffusion_for(loaded: LoadedModel, config: SampleConfig) -> GaussianDiffusion:
    """The diffusion ``loaded``'s model samples with, respaced by ``config.sampler``; a bad setting
    is a UsageError naming the option (or the file's own respacing), a damaged file's a ValueError."""
    try:  # settings that make no diffusion: --model.flags' (exit status 2) or the damaged file's (1)
        base = DiffusionConfig.from_dict(loaded.diffusion) if loaded.diffusion else DiffusionConfig()
        get_named_beta_schedule(base.noise_schedule, base.steps)
    except (TypeError, ValueError) as error:  # named as guided-diffusion's flags, not train.py's options
        said = (
            str(error)
            .replace("--model.diffusion.steps", "--diffusion_steps")
            .replace("--model.diffusion.", "--")
        )
        if config.model.flags:
            raise UsageError(f"--model.flags: {said}") from None
        raise ValueError(f"{config.model.checkpoint}: its stored diffusion settings: {said}") from None
    base = base.replace(learn_sigma=loaded.unet_config.learn_sigma)
    try:
        return sampling_diffusion(base, config.sampler)
    except ValueError as error:  # more steps than the model has, or a bad stored respacing
        given, stored = config.sampler.respacing, base.timestep_respacing
        where = f"--sampler.respacing {given}"
        if given is None:  # the file's own respacing, or the default: say which, and the way out
            used = f"its timestep_respacing {stored!r}" if stored else "the default respacing '100'"
            where = f"{config.model.checkpoint}: {used} (set --sampler.respacing)"
            if stored and config.model.flags:  # the respacing came from the flags, not the file
                where = f"--model.flags: --timestep_respacing {stored}"
        raise UsageError(f"{where}: {error}") from None


def check_model_options(config: SampleConfig) -> None:
    """--model.*: a model given, a preset that exists, flags that parse and build a UNet."""
    if not config.model.checkpoint:
        raise UsageError("--model.checkpoint: no model given; set it (and --model.preset for a released .pt)")
    if config.model.flags and config.model.preset:
        raise UsageError("--model.flags: give either it or --model.preset, not both")
    try:  # a mistake in the flag string or the preset's name is the user's: name the option
        if config.model.flags:
            build_unet(UNetConfig.from_guided_diffusion_flags(config.model.flags), device="meta")
        if config.model.preset:
            get_preset(config.model.preset)
    except (ValueError, KeyError, ZeroDivisionError) as err:  # KeyError: no such preset
        raise UsageError(f"--model.{'preset' if type(err) is KeyError else 'flags'}: {err.args[0]}") from None


def load(config: SampleConfig, device: torch.device) -> tuple[LoadedModel, Callable]:
    """``config.model`` loaded on ``device`` with the run's runtime settings, and its ``net(x, t, y)``."""
    check_model_options(config)
    try:
        loaded = load_model(config.model.checkpoint, preset=config.model.preset, flags=config.model.flags)
    except ArchitectureNotGiven as err:
        guess = f"--model.preset {err.guess}" if err.guess else f"presets: {', '.join(sorted(PRESETS))}"
        raise UsageError(
            f"--model.preset: {config.model.checkpoint} is a plain state dict, which does not record its "
            f"architecture; give --model.preset NAME or --model.flags '<its README flags>' ({guess})"
        ) from None
    except ArchitectureMismatch as err:  # an intact file, not the architecture the options give
        given = "flags" if config.model.flags else "preset" if config.model.preset else None
        if given is None:
            raise
        raise UsageError(f"--model.{given}: {err}") from None
    model = loaded.model.to(device).eval().requires_grad_(False)
    model.set_native_groupnorm(config.native_groupnorm)
    model.set_winograd(config.winograd and device.type == "cpu")  # a CPU kernel: no build for a GPU run
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        model = torch.compile(model)
    return loaded, make_net(model, device, config.precision, config.channels_last)


class References:
    """Reference images by index, loaded on demand (a small LRU cache, so a 70k-image set is
    never held in memory), with unreadable ones recorded in ``failed``, not raised. The
    background workers decode the next batch's references while a batch samples (the cache
    and ``failed`` are safe to share between threads)."""

    def __init__(self, config: SampleConfig, image_size: int, cache_size: int = 256) -> None:
        self.unconditional = config.unconditional or not config.references
        self.source = None if self.unconditional else reference_set(config, image_size)
        self.names = (
            [f"{i:06d}" for i in range(config.num_samples)] if self.source is None else self.source.names
        )
        self.failed: dict[str, str] = {}  # reference name: why it could not be read
        self.digests: dict[int, dict[str, str | None]] = {}  # index: stamp and SHA-256 of the bytes decoded
        self.get = functools.lru_cache(cache_size)(self._read)

    def _read(self, index: int) -> torch.Tensor | None:
        """uint8 (3, H, W), or None when unreadable (the error is kept in ``failed``)."""
        stamp = self.source.stamp(index)  # before reading: a change after it is seen
        self.digests[index] = {"reference_stamp": stamp, "reference_sha256": self.source.digest(index)}
        item, error = self.source.try_get(index)
        if item is None:
            self.failed[self.names[index]] = error or "unreadable"
            log.warning("skipping reference %s: %s", self.names[index], error)
            return None
        return item["image"]


@dataclass
class _Sampling:
    """What every batch of a run shares: the network, its respaced diffusion, the sampler and
    the task (P per factor N, the resolved range, the SDEdit start)."""

    net: Callable
    diffusion: GaussianDiffusion
    image_size: int
    device: torch.device
    sampler: SamplerSpec
    condition: Callable[[torch.Tensor, int | None], Condition]  # tasks.task_setup
    class_labels: list[int] | None = None


def _sample_batch(
    batch: list[WorkItem], images: dict[int, torch.Tensor | None], run: _Sampling
) -> tuple[list[WorkItem], torch.Tensor | None]:
    """Sample one batch; returns the items actually sampled and their uint8 images (B, 3, H, W).

    ``images``: the batch's references by index (None: unreadable); empty when unconditional.
    """
    condition = None
    if images:
        batch = [item for item in batch if images[item.reference] is not None]
        if not batch:
            return [], None
        reference = torch.stack([images[item.reference] for item in batch])
        condition = run.condition(reference, batch[0].factor)
    net = run.net
    if run.class_labels is not None:  # resolved in _run: one label per reference
        labels = [run.class_labels[item.reference] for item in batch]
        net = functools.partial(net, y=torch.tensor(labels, device=run.device))
    seeds = [item.seed for item in batch]
    return batch, generate(net, run.diffusion, seeds, run.image_size, run.device, run.sampler, condition)


def run(config: SampleConfig) -> RunResult:
    """Run a whole translation (see README); resumable: finished PNGs are never recomputed.

    On the CPU with ``cpu_malloc="tuned"`` the process's allocator is tuned for the run and
    set back to glibc's defaults afterwards (``ilvr_toolkit.runtime.tuned_cpu_malloc``).
    """
    start = time.perf_counter()
    device = resolve_device(config.device)
    with tuned_cpu_malloc(device.type == "cpu" and config.cpu_malloc == "tuned"), STOP:
        return _run(config, device, start)


def _check_output_dir(config: SampleConfig) -> None:
    """--output.dir is a folder (or not there yet), and not inside the references (its outputs
    would be read as references by the next run)."""
    given, out = Path(config.output.dir), Path(config.output.dir).resolve()
    if given.is_symlink() and not given.exists():
        raise UsageError(
            f"--output.dir {given}: a dangling link (to {os.readlink(given)}); expected a folder"
        )
    if (file := file_in_the_way(out)) is not None:
        where = "is a file" if file == out else f"cannot be made: {file} is a file"
        raise UsageError(f"--output.dir {config.output.dir}: {where}, expected a folder")
    if out.exists() and not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--output.dir {config.output.dir}: not writable (permission denied)")
    if not out.exists():
        _try_making(out, f"--output.dir {config.output.dir}")
    refs = None if config.unconditional or not config.references else Path(config.references).resolve()
    if refs is not None and refs.is_dir() and out.is_relative_to(refs):
        raise UsageError(
            f"--output.dir {config.output.dir}: inside --references {config.references}; choose another"
        )


def _try_making(folder: Path, option: str) -> None:
    """Make ``folder`` (and its missing parents) and remove them again: a folder that cannot be
    made is named before the model loads, and a refused run leaves nothing behind."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:  # exist_ok: the ranks of one run probe at once (each may remove what another made: it is empty)
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # no permission, a read-only or special file system
        raise UsageError(f"{option}: cannot be made: {error.strerror or error}") from None
    finally:
        for path in made:
            with contextlib.suppress(OSError):
                path.rmdir()


def _run(config: SampleConfig, device: torch.device, start: float) -> RunResult:
    ranks = init_ranks(device)
    if device.type == "cuda" and ranks.world_size > 1:
        device = torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    out_dir = Path(config.output.dir)
    _check_output_dir(config)
    loaded, net = load(config, device)
    image_size = loaded.unet_config.image_size
    diffusion = diffusion_for(loaded, config)
    refs = References(config, image_size)
    if not refs.unconditional and all(refs.source.try_get(i)[1] for i in range(len(refs.names))):
        raise UsageError(f"--references {config.references}: none of its images is readable")
    labels = resolve_class_labels(config.class_labels, refs.names, loaded.unet_config.num_classes)
    config = dataclasses.replace(config, class_labels=labels)
    factors = run_factors(config, refs.unconditional)
    condition = task_setup(config, image_size, diffusion, device, [] if refs.unconditional else factors)
    config = dataclasses.replace(config, num_shards=fixed_shard_count(config))  # stored: the run's
    indices = shard_range(len(refs.names), config.shard_index, config.num_shards)
    items = planned_items(config, refs.names, refs.unconditional, indices)
    mine = items[ranks.rank :: ranks.world_size]
    alone = config.num_shards == 1 and ranks.world_size == 1  # held: a second copy is refused
    part = ManifestPart.open(out_dir, config.shard_index, ranks.rank, alone)
    remove_dead_temps(out_dir)
    todo = [item for item in mine if not (out_dir / item.filename).exists()]  # PNGs are atomic
    result = RunResult(out_dir, skipped_existing=len(mine) - len(todo))
    check_settings(config, loaded, refs.unconditional)  # all checked: a rerun must match
    check_references_in_place(out_dir, refs.names, config.references)
    if not refs.unconditional:
        check_reference_content(out_dir, refs.source, config.references, indices)
    fixed_shard_count(config, record=True)  # only now, all checked: a refused attempt fixes nothing
    shared = _Sampling(net, diffusion, image_size, device, config.sampler, condition, labels)
    _sample_all(todo, refs, shared, config, ranks, part, result)
    barrier(ranks)
    finish(ranks)  # the summary and evaluation are single-process: leave the process group first
    if ranks.is_main and STOP.requested:
        leave_note(f"stopped after a batch, {len(result.written)} images written")
    elif ranks.is_main:
        whole = run_summary(config, refs.names, refs.unconditional)  # None: shards to finish, or merging
        if whole is not None:
            summarize(whole, loaded, diffusion, refs, result)
    result.failed_references, result.references = dict(refs.failed), refs
    result.seconds = time.perf_counter() - start
    return result


def check_settings(config: SampleConfig, loaded: LoadedModel, unconditional: bool) -> None:
    """The images in ``config.output.dir`` were made with ``config``'s settings (``check_same_run``)."""
    digests = {"model.sha256": loaded.sha256, "mask.sha256": config.mask and sha256_file(config.mask)}
    no_factor = run_factors(config, unconditional) == [None] and not unconditional  # inpaint, colorize
    check_same_run(Path(config.output.dir), config.to_dict(), digests, ("ilvr.factor",) if no_factor else ())


def _sample_all(
    todo: list[WorkItem],
    refs: References,
    run: _Sampling,
    config: SampleConfig,
    ranks: Any,
    part: ManifestPart,
    result: RunResult,
) -> None:
    """Sample ``todo`` in batches. While batch k samples, worker threads decode the references
    of batch k+1 and write the PNGs of batch k-1 (``config.workers``). A batch's manifest
    entries are saved before its PNGs are written: the merge keeps only entries whose PNG
    exists, and every PNG is written atomically, so a kill at any point loses nothing."""
    desc = f"ILVR rank {ranks.rank}" if ranks.world_size > 1 else "ILVR"
    bar = progress_bar(len(todo), desc, config.progress)
    plan = batches(todo, config.batch_size)

    def fetch(k: int) -> Callable[[], dict[int, torch.Tensor | None]]:
        if refs.unconditional or k >= len(plan):
            return dict
        indices = list(dict.fromkeys(item.reference for item in plan[k]))
        ready = io.prefetch(refs.get, indices)
        return lambda: dict(zip(indices, ready(), strict=True))

    with contextlib.closing(bar), BackgroundIO(config.workers) as io:
        pending = fetch(0)
        for k, batch in enumerate(plan):
            io.check()  # a write of batch k-1 that already failed stops the run before sampling more
            images, pending = pending(), fetch(k + 1)
            tic = time.perf_counter()
            done, out = _sample_batch(batch, images, run)
            seconds = (time.perf_counter() - tic) / max(len(done), 1)  # sampling only: I/O overlaps it
            io.drain()  # batch k-1's PNGs are on disk (bounded memory; write errors surface here)
            for item in done:
                entry = {"reference": refs.names[item.reference], "reference_index": item.reference}
                entry.update(refs.digests.get(item.reference, {}))
                entry.update(sample=item.sample, factor=item.factor, seed=item.seed)
                entry.update(seconds=round(seconds, 4), batch_size=len(batch), rank=ranks.rank)
                part.images[item.filename] = entry
            part.save(refs.failed)
            for item, image in zip(done, out if out is not None else [], strict=True):
                io.write(save_png, result.out_dir / item.filename, image)
                result.written.append(item.filename)
            bar.update(len(batch))
            if STOP.requested:
                break
    part.save(refs.failed)


def summarize(
    config: SampleConfig,
    loaded: LoadedModel,
    diffusion: GaussianDiffusion,
    refs: References,
    result: RunResult,
) -> None:
    """Main rank of a whole run (or of its last shard): merge the manifest parts, draw the grid
    from the PNGs on disk (the metrics are the evaluation's: ``sample.py`` runs it after)."""
    out_dir = result.out_dir
    result.manifest = out_dir / "manifest.json"
    checkpoint = {"path": str(config.model.checkpoint), "sha256": loaded.sha256, "kind": loaded.source_kind}
    header = {"checkpoint": {**checkpoint, "preset": config.model.preset}}
    header["unet"] = loaded.model.config.to_dict()  # as run: runtime settings of this config applied
    header.update(diffusion=loaded.diffusion, timestep_map=diffusion.timestep_map.tolist())
    header.update(config=config.to_dict(), versions=versions())
    merge_manifest(out_dir, header, result.manifest.name)
    if config.output.grid and not refs.unconditional:
        rows = [(refs.names[i], refs.get(i)) for i in range(len(refs.names))[: config.output.grid_max_rows]]
        rows = [(name, image) for name, image in rows if image is not None]
        grid_path, size = out_dir / "grid.png", loaded.unet_config.image_size
        operators = run_operators(config, size, torch.device("cpu"), run_factors(config, False))
        if build_grid(grid_path, out_dir, rows, operators, config.samples_per_reference):
            result.grid = grid_path

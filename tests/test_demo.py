"""The README's main job: the bundled demo, end to end (fewer steps than the real demo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ilvr_toolkit.conditioning import LowPass
from ilvr_toolkit.data.references import load_reference
from ilvr_toolkit.images import to_float

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def test_demo_runs_and_small_n_stays_closer_to_the_reference(tmp_path):
    assert (ROOT / "checkpoints" / "demo.pt").exists(), "the bundled demo model is missing"
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        str(ROOT / "sample.py"),
        "--config",
        str(ROOT / "configs" / "sample_demo.yaml"),
        "--ilvr.factor",
        "[2, 16]",
        "--samples_per_reference",
        "1",
        "--sampler.respacing",
        "25",
        "--output.dir",
        str(out),
        "--progress",
        "false",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    references = sorted((ROOT / "datasets" / "demo_references").glob("*.png"))
    assert len(references) >= 4
    for ref in references:
        for n in (2, 16):
            assert (out / f"{ref.stem}_N{n}_s0.png").exists()
    for name in ("grid.png", "manifest.json", "metrics.json"):
        assert (out / name).exists(), name
    assert str(out / "grid.png") in proc.stdout and "metrics" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"N2", "N16"} <= metrics.keys()

    lowpass = LowPass(32, 2)
    distances = {2: [], 16: []}
    for ref in references:
        target = lowpass(to_float(load_reference(ref, 32))[None])
        for n in (2, 16):
            output = lowpass(to_float(_png(out / f"{ref.stem}_N{n}_s0.png"))[None])
            distances[n].append((output - target).abs().mean().item())
    small, large = np.mean(distances[2]), np.mean(distances[16])
    print(f"mean |phi_2(out) - phi_2(ref)|: N=2 {small:.4f}, N=16 {large:.4f}")
    assert small < 0.5 * large

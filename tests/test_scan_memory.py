"""A scan's memory does not grow with the number of batches (issue 15).

Each measurement runs in a fresh process (its own ``VmHWM``, the peak resident set of the process
image): a tiny DINOv2 at 256x256 px (1025 tokens), every layer kept whole (``save_layers="all"``)
and every statistic (``method="all"``), 16 batches of 2 images, the peak read after each batch.
A positive control keeps each batch's capture alive, as a leaking loop would, and must be caught:
without it a bound that never fails would prove nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

WORKER = r"""
import sys, tempfile
from pathlib import Path
import numpy as np
from sinkscope.data import ImageItem
from sinkscope.models.tiny import load_tiny
from sinkscope.scanning import job, scan

def peak_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

leak = sys.argv[1] == "leak"
peaks, kept = [], []
forward = job._Scanner._forward
def measured(self, cap, good, arrays):
    out = forward(self, cap, good, arrays)
    if leak:
        kept.append(cap.collect())
    peaks.append(peak_mb())
    return out
job._Scanner._forward = measured

def item(i):
    return ImageItem(f"img{i}", f"random:{i}",
                     lambda: np.random.default_rng(i).integers(0, 255, (256, 256, 3), dtype=np.uint8))

ad = load_tiny("tiny-dinov2", image_size=(256, 256))
with tempfile.TemporaryDirectory() as tmp:
    res = scan(ad, images=[item(i) for i in range(32)], method="all", batch_size=2,
               out=Path(tmp) / "run", save_layers="all", progress=False)
    print({"peaks": peaks, "pictures": len(res.pixels)})
"""


def peaks_after_batches(leak: bool) -> list[float]:
    p = subprocess.run(
        [sys.executable, "-c", WORKER, "leak" if leak else "plain"], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1].replace("'", '"'))
    assert out["pictures"] == 24  # the scan keeps (on disk) and returns at most 24 pictures
    assert len(out["peaks"]) == 16
    return out["peaks"]


def growth(peaks: list[float], batch: int) -> float:
    """The peak after ``batch`` (1-based) relative to the peak after batch 2."""
    return peaks[batch - 1] / peaks[1] - 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_scans_peak_memory_does_not_climb_with_the_batches():
    peaks = peaks_after_batches(leak=False)
    assert growth(peaks, 8) < 0.05, peaks
    assert growth(peaks, 16) < 0.05, peaks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_memory_bound_catches_a_loop_that_keeps_each_batch():
    peaks = peaks_after_batches(leak=True)
    assert growth(peaks, 16) >= 0.05, peaks

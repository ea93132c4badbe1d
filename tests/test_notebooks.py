"""Every notebook in notebooks/ executes without error (outputs are not committed) and prints its
known findings; a cell that raises fails the test (nbclient raises ``CellExecutionError``)."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

#: per notebook: lines it must print (findings that would be wrong if the analysis were wrong) and
#: how many plotly figures it must display
EXPECTED: dict[str, tuple[list[str], int]] = {
    "01_find_sinks": (["patch norm sinks: 0", "sink dims:"], 0),
    "02_probe_sinks": (
        [
            # the real DINOv2-S: no sink patch in any of 150 textile images x 13 layers
            "images with a sink: 0 of 1950 (image, layer) pairs",
            # planted sinks: found from layer 2 on, at the painted cell of every image
            "images with a sink, per layer: {0: 0, 1: 0, 2: 200, 3: 200, 4: 200}",
            "sink at the painted cell: 200 of 200 | sink tokens per image: [1]",
        ],
        2,
    ),
    "03_attention_flow": (
        [
            "ViT sinks at the planted patch: [(2, 1)] | ViT token [10] | LLM position [10]",
            "projector trained: False",
            "warning: the projector is untrained",
            "ViT sinks: 0 of 257 visual tokens",  # CLS + 256 patches (full strategy, issue 26); norm:x5 marks patches
        ],
        7,
    ),
    "04_diysink": (
        # the fresh dual connector is the original model under sinks-front (the known answer)
        ["equal to 1e-4: True", "stage 1     : trained f_sink, f_nonsink", "stage router: trained router"],
        2,
    ),
    "05_eval": (["projector trained: True | items: 32", "task type"], 2),
}
#: wall-clock budget per notebook (they take well under a minute on 2 CPU cores)
BUDGET_S = 300


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") for c in code), "commit notebooks without outputs"
    assert all(c.get("execution_count") is None for c in code), "commit notebooks without execution counts"
    t0 = time.perf_counter()
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    elapsed = time.perf_counter() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    lines, n_figures = EXPECTED.get(path.stem, ([], 0))
    for line in lines:
        assert line in text, f"{path.name} did not print {line!r}"
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) >= n_figures, f"{path.name} showed {len(figures)} figures, expected {n_figures}"
    assert elapsed < BUDGET_S, f"{path.name} took {elapsed:.0f} s (budget {BUDGET_S} s)"

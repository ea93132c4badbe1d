"""`python -m sinkscope.figures`: a small figure list on tiny models - files, freshness, reruns, tiers, failures."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sinkscope import SinkscopeError
from sinkscope.figures import KINDS, SpecError, load_figure_list, regen, regenerate
from sinkscope.figures.cli import main
from sinkscope.models.tiny import paint_markers

H, W = 48, 40  # a 6 x 5 patch grid for the tiny ViTs (patch 8)

LIST = """
[runs.scan-tiny]
analysis = "scan"
model = "tiny-dinov2+sinks"
data = "imgs"
params = { method = "all", image_size = "48x40" }

[[figures]]
name = "tiny-norms"
run = "scan-tiny"
kind = "norm_distribution"
caption = "Norms of the tiny model with planted sinks."

[[figures]]
name = "tiny-counts"
run = "scan-tiny"
kind = "sink_count"

[[figures]]
name = "tiny-heatmap"
run = "scan-tiny"
kind = "patch_heatmap"
options = { image = "b.png" }

[[figures]]
name = "tiny-attention"
run = "scan-tiny"
kind = "attention_norm"

[[figures]]
name = "tiny-text"
analysis = "scan"
model = "tiny-llama+sinks"
params = { text = ["the cat is on the tree"], threshold = 50 }
kind = "text_norm"

[runs.probe-tiny]
analysis = "probe"
model = "tiny-dinov2+sinks"
data = "classes"
params = { folds = FOLDS, layers = [0, 2], groups = "cls,mean", image_size = "48x40", jobs = 1 }

[[figures]]
name = "tiny-probe"
run = "probe-tiny"
kind = "probe"

[runs.flow-tiny]
analysis = "flow"
model = "tiny-llava+sinks"
data = "imgs/a.png"
params = { analysis = ["rollout", "propagation", "knockout"], prompt = "what is this ?", vit_threshold = 100, window = 2 }

[[figures]]
name = "tiny-rollout"
run = "flow-tiny"
kind = "rollout"

[[figures]]
name = "tiny-sink-maps"
run = "flow-tiny"
kind = "sink_maps"

[[figures]]
name = "tiny-vit-groups"
run = "flow-tiny"
kind = "vit_group_attention"

[[figures]]
name = "tiny-llm-groups"
run = "flow-tiny"
kind = "llm_group_attention"

[[figures]]
name = "tiny-norm-bins"
run = "flow-tiny"
kind = "norm_bin"

[[figures]]
name = "tiny-knockout"
run = "flow-tiny"
kind = "knockout"

[runs.paper-clip]
analysis = "scan"
model = "openai/clip-vit-large-patch14-336"
data = "samples"
tier = "paper"
params = { threshold = 100, device = "cuda", dtype = "float16" }

[[figures]]
name = "paper-norms"
run = "paper-clip"
kind = "norm_distribution"
"""
CI_FIGURES = [
    "tiny-norms",
    "tiny-counts",
    "tiny-heatmap",
    "tiny-attention",
    "tiny-text",
    "tiny-probe",
    "tiny-rollout",
    "tiny-sink-maps",
    "tiny-vit-groups",
    "tiny-llm-groups",
    "tiny-norm-bins",
    "tiny-knockout",
]


def _chromium_or_skip() -> None:
    if not os.environ.get("CI") and not Path("/usr/bin/chromium").exists():
        pytest.skip("PNG export needs Chromium (/usr/bin/chromium; `make browser` installs it)")


@pytest.fixture()
def figdir(tmp_path, monkeypatch):
    """A figure list in tmp_path/figures with marked images and a two-class folder next to it."""
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))  # probe feature cache
    root = tmp_path / "figures"
    (root / "imgs").mkdir(parents=True)
    base = np.random.default_rng(0).integers(60, 200, (H, W, 3), dtype=np.uint8)
    Image.fromarray(paint_markers(base, [(4, 0), (1, 3)])).save(root / "imgs" / "b.png")
    # 32 x 32: the tiny LLaVA's own input size, so its marker stays on patch (2, 1)
    Image.fromarray(paint_markers(np.full((32, 32, 3), 110, np.uint8), [(2, 1)])).save(
        root / "imgs" / "a.png"
    )
    for cls, color in (("x", (200, 30, 0)), ("y", (0, 30, 200))):
        (root / "classes" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (W, H), tuple(min(255, v + 7 * i) for v in color)).save(
                root / "classes" / cls / f"{i}.png"
            )
    (root / "figures.toml").write_text(LIST.replace("FOLDS", "3"))
    return root


@pytest.fixture()
def spy(monkeypatch):
    """Record the id of every analysis run actually executed."""
    calls: list[str] = []
    real = regen.execute_run

    def wrapped(run, *a, **k):
        calls.append(run.id)
        return real(run, *a, **k)

    monkeypatch.setattr(regen, "execute_run", wrapped)
    return calls


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def _regen(root: Path, **kw):
    lines: list[str] = []
    rep = regenerate(root / "figures.toml", echo=lines.append, progress=False, **kw)
    return rep, lines


def test_every_kind_in_the_registry_is_covered_by_the_project_list():
    spec = load_figure_list(Path(__file__).resolve().parents[1] / "figures" / "figures.toml")
    ci_kinds = {f.kind for f in spec.figures if f.tier == "ci"}
    missing = set(KINDS) - ci_kinds
    assert not missing, f"add a ci-tier figure to figures/figures.toml for the kind(s) {sorted(missing)}"
    paper = {spec.runs[f.run_id].model for f in spec.figures if f.tier == "paper"}
    assert paper == {"openai/clip-vit-large-patch14-336", "llava-hf/llava-1.5-7b-hf", "run:paper-diysink-router"}
    # the DIYSink chain starts from a TinyLLaVA-0.5B-style hub model (SigLIP + Qwen 0.5B)
    chain = spec.runs["paper-eval-diysink"].chain()
    assert [r.analysis for r in chain] == ["diysink-init"] + ["diysink-train"] * 3 + ["eval"]
    assert chain[0].model == "llava-hf/llava-interleave-qwen-0.5b-hf"
    assert {spec.runs[f.run_id].analysis for f in spec.figures if f.tier == "paper"} == {
        "scan",
        "probe",
        "flow",
        "eval",
    }


def test_the_paper_tier_runs_use_the_papers_settings():
    """Fig. 3A: generated output tokens and the absolute ViT threshold 100 (CLIP-L); the probe
    compares sinks with single non-sink patches (the paper's 0.512), not only their mean."""
    from sinkscope.flow.run import paper_settings

    spec = load_figure_list(Path(__file__).resolve().parents[1] / "figures" / "figures.toml")
    flows = [r.config for r in spec.runs.values() if r.tier == "paper" and r.analysis == "flow"]
    assert flows
    for c in flows:  # the rule is named: a hub model's default would be the automatic gap
        assert c.sink_rule == "norm:100"
        got = paper_settings(c.sink_rule, c.generate, c.bin_width)
        assert got["matches"], got["differences"]
    probes = [r.config for r in spec.runs.values() if r.tier == "paper" and r.analysis == "probe"]
    assert probes and all(c.sink_rule == "norm:100" and "nonsink_random" in c.groups for c in probes)
    # every paper-tier run of CLIP-L / LLaVA-1.5 that marks ViT sinks names the paper's rule
    def marks_sinks(r) -> bool:
        return r.analysis in ("flow", "probe") or (
            r.analysis == "eval" and any(v not in ("default", "no-image") for v in r.config.variants)
        )

    clip_llava = [r for r in spec.runs.values() if r.tier == "paper" and marks_sinks(r)
                  and ("clip-vit-large" in r.config.model or "llava-1.5" in r.config.model)]  # fmt: skip
    assert len(clip_llava) == 3 and all(r.config.sink_rule == "norm:100" for r in clip_llava)


def test_regeneration_writes_html_then_does_no_work_then_reruns_only_the_changed_analysis(figdir, spy):
    out = figdir / "out"
    rep, lines = _regen(figdir, png=False)
    assert rep.ok, [f.error for f in rep.failed]
    assert sorted(spy) == sorted(["scan-tiny", "probe-tiny", "flow-tiny", rep.figures[4].run_id])
    assert [f.name for f in rep.figures] == CI_FIGURES and all(f.status == "rendered" for f in rep.figures)
    for name in CI_FIGURES:
        page = (out / f"{name}.html").read_text()
        assert "plotly-graph-div" in page and f'id="fig-{name}"' in page and "Plotly.newPlot" in page
        assert 'src="plotly.min.js"' in page  # the shared offline copy
        assert not (out / f"{name}.png").exists()
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    assert "Norms of the tiny model with planted sinks." in (out / "tiny-norms.html").read_text()
    # the paper tier is neither run nor drawn by default
    assert not (out / "paper-norms.html").exists() and not (out / "runs" / "paper-clip").exists()
    # results live in runs/<id>, with their fingerprint
    for rid in ("scan-tiny", "probe-tiny", "flow-tiny"):
        meta = json.loads((out / "runs" / rid / "run.json").read_text())
        assert (
            meta["fingerprint"] == rep.runs[rid].fingerprint
            and (out / "runs" / rid / "summary.json").exists()
        )
    assert (out / "runs" / "scan-tiny" / "tokens.parquet").exists()
    # each run folder is an ordinary run: its config.json names the folder, so load_run reruns it there
    from sinkscope.runs import load_run

    spec = load_figure_list(figdir / "figures.toml")
    for rid in ("scan-tiny", "probe-tiny", "flow-tiny"):
        cfg = load_run(out / "runs" / rid).config
        assert cfg == spec.runs[rid].config.replace(out=str((out / "runs" / rid).resolve())), rid
    assert load_run(out / "runs" / "probe-tiny").config.n_jobs == 1  # the CLI spelling `jobs` of the list
    assert not (out / "runs" / "scan-tiny" / "cli-output.txt").exists()
    assert (out / "runs" / "flow-tiny" / "knockout.csv").exists()
    assert not list((out / "runs").glob(".tmp-*"))
    man = json.loads((out / "manifest.json").read_text())
    rec = man["figures"]["tiny-norms"]
    assert rec["run"] == "scan-tiny" and rec["files"] == ["tiny-norms.html"] and rec["status"] == "rendered"
    assert rec["fingerprint"] == rep.runs["scan-tiny"].fingerprint and rec["timings"]["render_s"] >= 0
    assert "paper-norms" not in man["figures"]

    # unchanged inputs: no analysis runs, nothing is redrawn, no file is touched
    before = _mtimes(out)
    spy.clear()
    rep2, lines2 = _regen(figdir, png=False)
    assert spy == [] and rep2.ok, {k: v.reason for k, v in rep2.runs.items()}
    assert {f.status for f in rep2.figures} == {"fresh"} and {r.status for r in rep2.runs.values()} == {
        "cached"
    }
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }
    assert sum(x.startswith("fresh") for x in lines2) == len(CI_FIGURES)

    # one parameter changes: only that analysis reruns and only its figure is redrawn
    (figdir / "figures.toml").write_text(LIST.replace("FOLDS", "2"))
    rep3, lines3 = _regen(figdir, png=False)
    assert spy == ["probe-tiny"] and rep3.ok
    status = {f.name: f.status for f in rep3.figures}
    assert status.pop("tiny-probe") == "rendered" and set(status.values()) == {"fresh"}
    assert rep3.runs["probe-tiny"].reason == "changed: config"
    assert json.loads((out / "runs" / "probe-tiny" / "summary.json").read_text())["folds"] == 2
    assert _mtimes(out)["tiny-norms.html"] == before["tiny-norms.html"]

    # a data file changes: the runs reading it rerun (scan and flow read imgs/a.png), the probe does not
    spy.clear()
    img = figdir / "imgs" / "a.png"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    rep4, _ = _regen(figdir, png=False)
    assert (
        sorted(spy) == ["flow-tiny", "scan-tiny"] and rep4.runs["scan-tiny"].reason == "changed: data_files"
    )

    # --force reruns everything selected; --only picks figures (and their runs) by name
    spy.clear()
    rep5, _ = _regen(figdir, png=False, only=["tiny-kn*"], force=True)
    assert spy == ["flow-tiny"] and [f.name for f in rep5.figures] == ["tiny-knockout"]


def test_png_export_and_freshness(figdir, spy):
    _chromium_or_skip()
    out = figdir / "out"
    only = ["tiny-norms", "tiny-heatmap", "tiny-rollout"]
    rep, _ = _regen(figdir, only=only)
    assert rep.ok, [f.error for f in rep.failed]
    for name in only:
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        w, h = Image.open(out / f"{name}.png").size
        f = load_figure_list(figdir / "figures.toml").figure(name)
        assert w == f.width * f.scale and h >= f.height * f.scale  # a caption strip may add height
        assert (out / f"{name}.html").exists()
    # the caption is drawn under the figure: the PNG is taller than the plot
    assert Image.open(out / "tiny-norms.png").size[1] > 600 * 2
    man = json.loads((out / "manifest.json").read_text())
    assert man["figures"]["tiny-norms"]["files"] == ["tiny-norms.html", "tiny-norms.png"]
    assert man["figures"]["tiny-norms"]["timings"]["png_s"] > 0
    before = _mtimes(out)
    spy.clear()
    rep2, _ = _regen(figdir, only=only)
    assert spy == [] and {f.status for f in rep2.figures} == {"fresh"}, {
        k: v.reason for k, v in rep2.runs.items()
    }
    assert all(_mtimes(out)[f"{n}.png"] == before[f"{n}.png"] for n in only)
    # a deleted PNG is drawn again, without rerunning the analysis
    (out / "tiny-rollout.png").unlink()
    rep3, _ = _regen(figdir, only=only)
    assert spy == [] and {f.name: f.status for f in rep3.figures}["tiny-rollout"] == "rendered"


def test_paper_tier_is_listed_but_not_run_by_default(figdir, spy, capsys):
    assert main(["--list", "-f", str(figdir / "figures.toml")]) == 0
    text = capsys.readouterr().out
    row = next(x for x in text.splitlines() if "paper-norms" in x)
    assert " paper " in row and "--tier paper" in row and not row.startswith("*")
    assert next(x for x in text.splitlines() if "tiny-norms" in x).startswith("*")
    assert (
        "ScanConfig(model='openai/clip-vit-large-patch14-336', images=('embedded',), threshold=100.0, "
        "device='cuda', dtype='float16')" in text
    )
    assert spy == []  # listing runs nothing
    spec = load_figure_list(figdir / "figures.toml")
    assert "paper-norms" not in [f.name for f in spec.select()]
    assert [f.name for f in spec.select(tier="paper")] == ["paper-norms"]
    assert [f.name for f in spec.select(only=["paper-norms"])] == ["paper-norms"]
    assert len(spec.select(tier="all")) == len(CI_FIGURES) + 1


def test_a_failing_run_or_figure_does_not_stop_the_others(figdir, spy, capsys):
    text = (figdir / "figures.toml").read_text()
    text = text.replace('options = { image = "b.png" }', 'options = { image = "nope.png" }')
    text += (
        '\n[[figures]]\nname = "broken"\nanalysis = "scan"\nmodel = "no-such-model"\nkind = "sink_count"\n'
    )
    (figdir / "figures.toml").write_text(text)
    rc = main(["-f", str(figdir / "figures.toml"), "--no-png", "-q", "--only", "tiny-*", "--only", "broken"])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "FAILED   tiny-heatmap: ValueError: no image 'nope.png'" in printed
    assert "FAILED   broken: run scan-no-such-model-" in printed
    out = figdir / "out"
    man = json.loads((out / "manifest.json").read_text())
    assert (
        man["figures"]["broken"]["status"] == "failed"
        and man["figures"]["tiny-heatmap"]["status"] == "failed"
    )
    assert all((out / f"{n}.html").exists() for n in CI_FIGURES if n != "tiny-heatmap")
    assert not (out / "tiny-heatmap.html").exists()
    # the failed run left nothing behind: no results folder, no temporary folder
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert not any(r.startswith(("scan-no-such-model", ".tmp-")) for r in runs)


def test_a_failed_rerun_keeps_the_previous_results(figdir, monkeypatch):
    rep, _ = _regen(figdir, png=False, only=["tiny-counts"])
    assert rep.ok
    run_dir = figdir / "out" / "runs" / "scan-tiny"
    before = (run_dir / "run.json").read_text()

    def boom(config, progress=True):
        (Path(config.out) / "parts").mkdir(parents=True)  # half-written results
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr("sinkscope.api.run", boom)
    rep2, _ = _regen(figdir, png=False, only=["tiny-counts"], force=True)
    assert rep2.figures[0].status == "failed" and "killed mid-run" in rep2.figures[0].error
    assert (run_dir / "run.json").read_text() == before and (run_dir / "tokens.parquet").exists()
    assert not list(run_dir.parent.glob(".tmp-*"))
    # the figure is not left standing for results it was not drawn from
    assert not (figdir / "out" / "tiny-counts.html").exists()


def test_a_figure_that_fails_to_redraw_leaves_no_stale_file(figdir):
    rep, _ = _regen(figdir, png=False, only=["tiny-heatmap"])
    assert rep.ok and (figdir / "out" / "tiny-heatmap.html").exists()
    toml = figdir / "figures.toml"
    toml.write_text(
        toml.read_text().replace('options = { image = "b.png" }', 'options = { image = "nope.png" }')
    )
    rep2, _ = _regen(figdir, png=False, only=["tiny-heatmap"])
    assert rep2.figures[0].status == "failed"
    assert not (figdir / "out" / "tiny-heatmap.html").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('kind = "sink_count"', 'kind = "sink_cout"'), "unknown kind 'sink_cout'"),
        (
            ('kind = "sink_count"', 'kind = "probe"'),
            "kind 'probe' draws probe results but run 'scan-tiny' is a scan",
        ),
        (('method = "all"', 'methd = "all"'), "run 'scan-tiny': unknown scan param 'methd'; params: "),
        (('method = "all"', 'method = "bogus"'), "run 'scan-tiny': method: choose from norm, attention"),
        (
            ('method = "all"', "method = { a = 1 }"),
            "run 'scan-tiny': param 'method': expected a string or a list, got {",
        ),
        (("folds = 3", 'folds = "3"'), "run 'probe-tiny': param 'folds': expected an integer, got '3'"),
        (("window = 2", "window = 0"), "run 'flow-tiny': window: must be an integer >= 1, got 0"),
        (('device = "cuda"', 'device = "gpu0"'), "run 'paper-clip': device: 'gpu0' is not a device name"),
        (
            ('options = { image = "b.png" }', 'options = { img = "b.png" }'),
            "bad options for kind 'patch_heatmap'",
        ),
        (
            ('run = "flow-tiny"\nkind = "rollout"', 'run = "flow-tny"\nkind = "rollout"'),
            "unknown run 'flow-tny'",
        ),
        (('tier = "paper"', 'tier = "gpu"'), "tier must be one of"),
        (('params = { method = "all"', 'params = { out = "x", method = "all"'), "params may not set 'out'"),
        (
            ('params = { method = "all"', 'params = { images = "x", method = "all"'),
            "params may not set 'images'",
        ),
    ],
)
def test_list_errors_name_the_entry_and_the_problem(figdir, edit, message):
    p = figdir / "figures.toml"
    p.write_text(p.read_text().replace(*edit, 1))
    with pytest.raises(SpecError) as e:
        load_figure_list(p)
    assert message in str(e.value)
    assert str(e.value).count("\n") == 0  # one problem, one line (a bad run is not repeated per figure)


def test_cli_unknown_only_name_fails_before_running_anything(figdir, spy, capsys):
    assert main(["-f", str(figdir / "figures.toml"), "--only", "nothing-like-this"]) == 2
    assert "no figure matches 'nothing-like-this'" in capsys.readouterr().err and spy == []


def test_the_module_entry_point_lists_the_project_figures():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "sinkscope.figures", "--list"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "dinov2-norms" in r.stdout and "paper-llava-norm-bins" in r.stdout
    assert "figure list figures/figures.toml -> figures/out" in r.stdout


def test_a_second_regeneration_into_the_same_folder_fails_at_once(figdir, spy, capsys):
    import fcntl

    out = figdir / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # a regeneration in progress
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SinkscopeError, match="another figure regeneration is writing to"):
            _regen(figdir, png=False, only=["tiny-counts"])
        assert main(["-f", str(figdir / "figures.toml"), "--no-png", "-q", "--only", "tiny-counts"]) == 2
        assert "another figure regeneration" in capsys.readouterr().err
    assert spy == []  # nothing ran while the folder was taken
    rep, _ = _regen(figdir, png=False, only=["tiny-counts"])  # released: runs normally
    assert rep.ok


PROJECT_LIST = Path(__file__).resolve().parents[1] / "figures" / "figures.toml"
#: every run of figures/figures.toml -> the config fields its params and data must give
PROJECT_RUNS = {
    "scan-dinov2": {"model": "dinov2-small", "images": ("embedded",), "method": "all", "save_layers": "6,12"},
    "scan-smollm2": {
        "model": "smollm2-135m",
        "images": None,
        "texts": (
            "The capital of France is Paris, and the capital of Italy is",
            "Attention sinks are tokens that receive a large share of attention.",
        ),
        "method": "all",
    },
    "probe-dinov2-faces": {"dataset": "lfw-faces", "layers": "0,2,4,6,8,10,12", "folds": 5},
    "flow-mini-llava": {
        "model": "mini-llava",
        "images": ("embedded:1",),
        "analyses": ("rollout", "propagation", "knockout"),
        "stride": 3,
        "chat": True,
    },
    "eval-mini-llava": {
        "model": "mini-llava",
        "tasks": ("shapes", "lfw-faces", "textile"),
        "limit": 16,
        "variants": ("default", "no-image"),
    },
    "paper-scan-clip": {
        "model": "openai/clip-vit-large-patch14-336",
        "method": "all",
        "threshold": 100.0,
        "save_layers": "23",
        "device": "cuda",
        "dtype": "float16",
    },
    "paper-probe-clip": {
        "dataset": "textile",
        "sink_rule": "norm:100",
        "groups": ("sink", "nonsink", "nonsink_random", "cls", "mean", "random"),
        "device": "cuda",
        "dtype": "float16",
    },
    "paper-flow-llava": {
        "model": "llava-hf/llava-1.5-7b-hf",
        "images": ("embedded:1",),
        "analyses": ("rollout", "propagation", "knockout"),
        "prompt": "What is the main object in the image?",
        "sink_rule": "norm:100",
        "generate": 8,
        "device": "cuda",
        "dtype": "float16",
    },
    "paper-eval-llava-mme": {
        "model": "llava-hf/llava-1.5-7b-hf",
        "tasks": ("hf:lmms-lab/MME", "shapes"),
        "variants": ("default", "no-image"),
        "device": "cuda",
        "dtype": "float16",
    },
    "eval-mini-llava-interventions": {
        "model": "mini-llava",
        "tasks": ("shapes",),
        "limit": 16,
        "variants": ("both", "sink-only", "nonsink-only", "var"),
    },
    "paper-diysink-init": {"model": "llava-hf/llava-interleave-qwen-0.5b-hf", "sink_rule": "norm"},
    "paper-diysink-stage1": {
        "model": str(PROJECT_LIST.parent.resolve() / "out" / "runs" / "paper-diysink-init"),
        "stage": "1", "steps": 2000, "batch_size": 16, "lr": 2e-5, "mixed_precision": "bf16", "device": "cuda",
    },
    "paper-diysink-stage2": {
        "model": str(PROJECT_LIST.parent.resolve() / "out" / "runs" / "paper-diysink-stage1"),
        "stage": "2", "steps": 2000, "batch_size": 16, "lr": 2e-5, "lora_rank": 16, "mixed_precision": "bf16",
        "device": "cuda",
    },
    "paper-diysink-router": {
        "model": str(PROJECT_LIST.parent.resolve() / "out" / "runs" / "paper-diysink-stage2"),
        "stage": "router", "batch_size": 20, "lr": 1e-2, "mixed_precision": "bf16", "device": "cuda",
    },
    "paper-eval-diysink": {
        "model": str(PROJECT_LIST.parent.resolve() / "out" / "runs" / "paper-diysink-router"),
        "tasks": ("hf:lmms-lab/MME",),
        "variants": ("baseline", "dual", "dual-sink-only", "dual-nonsink-only", "cot", "rew"),
        "mode": "generate",
        "device": "cuda",
        "dtype": "bfloat16",
    },
    "paper-eval-llava-sinks-front": {
        "model": "llava-hf/llava-1.5-7b-hf",
        "tasks": ("hf:lmms-lab/MME",),
        "variants": ("both", "sinks-front", "sinks-end", "sink-only", "nonsink-only", "var"),
        "sink_rule": "norm:100",
        "positions": "keep",
        "mode": "generate",
        "device": "cuda",
        "dtype": "float16",
    },
}


def test_every_run_of_the_project_list_builds_its_config_without_running():
    """ci and paper tiers alike: params -> config fields, checked when the list is read (the
    paper tier's cuda device is checked only when it runs, so this passes on a laptop)."""
    from sinkscope.config import CONFIGS
    from sinkscope.figures.params import config_fields

    spec = load_figure_list(PROJECT_LIST)
    assert set(spec.runs) == set(PROJECT_RUNS)
    for rid, want in PROJECT_RUNS.items():
        run = spec.runs[rid]
        c = run.config
        assert type(c) is CONFIGS[run.analysis], rid
        assert {k: getattr(c, k) for k in want} == want, rid
        assert c.out == str(PROJECT_LIST.parent.resolve() / "out" / "runs" / rid)
        d = json.loads(c.to_json())  # JSON types only; the float threshold stays a float
        assert d["analysis"] == run.analysis and d.get("device") == want.get("device")
        # the table above checks every param the list gives
        assert set(config_fields(run.analysis, run.params)) <= set(want), rid
    assert {r.tier for r in spec.runs.values()} == {"ci", "paper"}


def test_params_map_onto_config_fields_with_their_types():
    from sinkscope.figures.params import PARAM_ALIASES, config_fields

    assert config_fields(
        "scan", {"method": "all", "save-layers": [6, 12], "threshold": 100, "layers": 12}
    ) == {
        "method": "all",
        "save_layers": "6,12",
        "threshold": 100.0,
        "layers": "12",
    }
    # the CLI spellings of earlier lists
    assert config_fields("scan", {"text": "one prompt, with a comma", "no_report": True}) == {
        "texts": ("one prompt, with a comma",),
        "report": False,
    }
    assert config_fields(
        "probe", {"groups": "cls, mean", "jobs": 1, "label": ["a"], "no-cache": True, "image_size": "48x40"}
    ) == {"groups": ("cls", "mean"), "n_jobs": 1, "labels": ("a",), "cache": False, "image_size": (48, 40)}
    assert config_fields("probe", {"groups": ["sink"], "image_size": 224}) == {
        "groups": ("sink",),
        "image_size": 224,
    }
    assert config_fields("flow", {"analysis": ["all"], "generate": 8}) == {"generate": 8}
    assert config_fields("flow", {"analyses": "rollout,knockout"}) == {"analyses": ("rollout", "knockout")}
    assert set(PARAM_ALIASES) == {"scan", "probe", "flow"}
    for params, message in [
        ({"chat": "yes"}, "param 'chat': expected true or false, got 'yes'"),
        ({"generate": 2.5}, "param 'generate': expected an integer, got 2.5"),
        ({"vit_threshold": "100"}, "param 'vit_threshold': expected a number, got '100'"),
        (
            {"analysis": ["rollout"], "analyses": ["knockout"]},
            "params 'analysis' and 'analyses' both set analyses",
        ),
        ({"dataset": "x"}, "params may not set 'dataset'"),
    ]:
        with pytest.raises(SpecError) as e:
            config_fields("flow" if "dataset" not in params else "probe", params)
        assert message in str(e.value)


def test_an_unknown_param_fails_at_load_time_in_one_line_naming_the_run_and_the_key(tmp_path, spy):
    p = tmp_path / "figures.toml"
    p.write_text(
        '[runs.flow-x]\nanalysis = "flow"\nmodel = "tiny-llava+sinks"\n'
        'params = { vit_treshold = 100 }\n\n[[figures]]\nname = "x"\nrun = "flow-x"\nkind = "rollout"\n'
    )
    with pytest.raises(SpecError) as e:
        load_figure_list(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: run 'flow-x': unknown flow param 'vit_treshold'; params: ")
    assert "vit_threshold" in msg.split("params: ", 1)[1]
    assert spy == []


def test_the_figures_package_does_not_import_the_cli():
    """Layers go one way: the CLI imports figures, never the reverse (module and function level)."""
    import ast

    import sinkscope.figures

    pkg = Path(sinkscope.figures.__file__).parent
    offenders = []
    for f in sorted(pkg.rglob("*.py")):
        mod = "sinkscope.figures." + ".".join(f.relative_to(pkg).with_suffix("").parts)
        package = mod.rsplit(".", 1)[0] if f.name != "__init__.py" else mod.removesuffix(".__init__")
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                names = [stem] + [f"{stem}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value] if node.value.startswith("sinkscope.cli") else []
            hits = [n for n in names if n == "sinkscope.cli" or n.startswith("sinkscope.cli.")]
            if hits:
                offenders.append(f"{f.relative_to(pkg)}:{node.lineno}: {hits[0]}")
    assert offenders == []
    assert len(list(pkg.glob("*.py"))) >= 7  # the walk saw the package


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the message of a machine without CUDA"
)
def test_a_paper_run_on_a_machine_without_its_device_fails_in_one_line_before_any_work(figdir, spy):
    rep, lines = _regen(figdir, png=False, only=["paper-norms"])
    assert spy == ["paper-clip"] and not rep.ok
    assert "device: 'cuda' asked, but this machine has no CUDA device" in rep.figures[0].error
    assert not any((figdir / "out" / "runs").iterdir())  # nothing left behind


CHAIN = """
[runs.dual0]
analysis = "diysink-init"
model = "tiny-llava+sinks"
params = { sink_rule = "norm:100" }

[runs.dual1]
analysis = "diysink-train"
model = "run:dual0"
params = { stage = "2", steps = STEPS, batch_size = 2, n_per_task = 2, real = [] }

[runs.dual-eval]
analysis = "eval"
model = "run:dual1"
data = "shapes"
params = { limit = 2, variants = ["baseline", "dual"] }

[[figures]]
name = "dual-acc"
run = "dual-eval"
kind = "eval_accuracy"
"""


def test_a_chain_of_runs_trains_then_evaluates_and_reruns_only_from_what_changed(tmp_path, spy):
    """``model = "run:ID"``: DIYSink's init -> stage 2 -> evaluation run in that order, each on
    the previous run's folder; a second pass does nothing; a changed stage reruns itself and the
    evaluation after it, not the init before it."""
    root = tmp_path / "figures"
    root.mkdir()
    (root / "figures.toml").write_text(CHAIN.replace("STEPS", "1"))
    rep, _ = _regen(root, png=False)
    assert not rep.failed and spy == ["dual0", "dual1", "dual-eval"]
    runs = root / "out" / "runs"
    cfg = json.loads((runs / "dual-eval" / "config.json").read_text())
    assert cfg["model"] == str((runs / "dual1").resolve())
    s = json.loads((runs / "dual-eval" / "summary.json").read_text())
    assert [h["step"] for h in s["diysink"]["history"]][-1] == "stage 2"
    spy.clear()
    _regen(root, png=False)
    assert spy == []
    (root / "figures.toml").write_text(CHAIN.replace("STEPS", "2"))
    _regen(root, png=False)
    assert spy == ["dual1", "dual-eval"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (('model = "run:dual0"', 'model = "run:nope"'), "run 'dual1': model 'run:nope': no run 'nope' in the list"),
        (('model = "tiny-llava+sinks"', 'model = "run:dual-eval"'), "makes a cycle: dual0 -> dual-eval -> dual1 -> dual0"),
        (('model = "tiny-llava+sinks"', 'model = "tiny-llava+sinks"\ndata = "shapes"'), "diysink-init reads no data"),
    ],
)
def test_chained_run_errors_name_the_run(tmp_path, edit, message):
    p = tmp_path / "figures.toml"
    p.write_text(CHAIN.replace("STEPS", "1").replace(*edit))
    with pytest.raises(SpecError, match=re.escape(message)):
        load_figure_list(p)

"""Data-parallel runs under ``accelerate launch``: each process scans its shard, the main one
merges into the same ``tokens.parquet`` as one process, and a killed run resumes per shard; a
probe and a flow run under two processes write what one process writes.

Two CPU processes on one machine: accelerate 1.x's ``--cpu`` launcher starts only one process
there (several need MPI), so the GPUs are hidden and the multi-GPU launcher (torchrun) is used;
sinkscope joins the process group through ``accelerate.PartialState`` (gloo).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sinkscope import distributed, scan
from sinkscope._utils import SinkscopeError
from sinkscope.flow.run import run_flow
from sinkscope.models.tiny import paint_markers
from sinkscope.probing import GroupFeatures, probe

from .conftest import CELLS, H, W, photo

pytest.importorskip("accelerate")

BIN = Path(sys.executable).parent
N_IMAGES = 12
KEY = ["image", "layer", "token"]
# rank 1 dies (as if killed) right after logging its first batch; the launcher then ends rank 0
DIE_AFTER_FIRST_BATCH = """
import importlib, os, sys
scan_module = importlib.import_module("sinkscope.scanning")  # the module (sinkscope.scan is the function)
real_log = scan_module._RunDir.log
def log(self, records):
    real_log(self, records)
    if os.environ.get("RANK") == "1":
        os._exit(3)
scan_module._RunDir.log = log
from sinkscope.cli import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imgs")
    for i in range(N_IMAGES):
        Image.fromarray(paint_markers(photo(i), CELLS[i % len(CELLS)])).save(d / f"im{i:02d}.png")
    return d


@pytest.fixture(scope="module")
def single(images, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("single")
    scan(
        "tiny-dinov2+sinks",
        images=[str(images)],
        out=out,
        image_size=(H, W),
        batch_size=2,
        progress=False,
        report=False,
    )
    return _sorted(pd.read_parquet(out / "tokens.parquet"))


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(KEY).reset_index(drop=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(script: list[str], *args: str, timeout: int = 120, **env_extra: str):
    """``accelerate launch`` of 2 CPU processes running ``script args``."""
    cmd = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        *script, *args,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _launch(script: list[str], images: Path, out: Path, *extra: str, timeout: int = 120):
    args = [
        "scan", "--model", "tiny-dinov2+sinks", "--images", str(images), "--out", str(out),
        "--image-size", f"{H}x{W}", "--batch-size", "2", "-q", *extra,
    ]  # fmt: skip
    return _accelerate(script, *args, timeout=timeout)


def _logged(path: Path) -> list[list[str]]:
    """Image names per line (batch) of a progress log."""
    return [[r["image"] for r in json.loads(x)] for x in path.read_text().splitlines() if x.strip()]


def test_two_processes_scan_their_shards_and_merge_the_same_table(images, single, tmp_path):
    out = tmp_path / "run"
    r = _launch([str(BIN / "sinkscope")], images, out, "--no-report")
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in images.iterdir())
    for rank in (0, 1):  # each process scanned exactly its shard (image i -> process i % 2), once
        logged = [n for line in _logged(out / f"progress.rank{rank}.jsonl") for n in line]
        assert logged == names[rank::2]
        assert {p.name.split("-part-")[0] for p in (out / "parts").glob(f"rank{rank}-*")} == {f"rank{rank}"}
    assert not list((out / "parts").glob("part-*"))
    pd.testing.assert_frame_equal(_sorted(pd.read_parquet(out / "tokens.parquet")), single)
    s = json.loads((out / "summary.json").read_text())
    assert s["distributed"]["num_processes"] == 2
    assert s["distributed"]["images_per_process"] == [6, 6]
    assert s["n_ok"] == N_IMAGES and len(s["images"]) == N_IMAGES
    # the merged progress.jsonl makes the folder read like a single-process run (seen pictures too)
    from sinkscope.scanning import seen_pictures

    assert len(seen_pictures(out)) == N_IMAGES


def test_a_killed_two_process_scan_resumes_per_shard_without_duplicates(images, single, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "die_after_first_batch.py"
    script.write_text(DIE_AFTER_FIRST_BATCH)
    r = _launch([str(script)], images, out, "--no-report")
    assert r.returncode != 0
    assert not (out / "tokens.parquet").exists()
    first = _logged(out / "progress.rank1.jsonl")
    assert len(first) == 1 and len(first[0]) == 2  # rank 1 logged one batch of 2, then died
    r = _launch([str(BIN / "sinkscope")], images, out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert not tokens.duplicated(KEY).any()
    pd.testing.assert_frame_equal(_sorted(tokens), single)
    # the resumed rank 1 scanned the rest of its shard only: nothing of its first batch again
    lines = _logged(out / "progress.rank1.jsonl")
    again = [n for line in lines[1:] for n in line]
    assert not set(again) & set(first[0]) and len(again) == N_IMAGES // 2 - 2
    # the merged parts hold each image once
    parts = pd.concat([pd.read_parquet(p) for p in (out / "parts").glob("*.parquet")])
    logged = json.loads((out / "progress.jsonl").read_text().splitlines()[0])
    assert sorted(r["image"] for r in logged) == sorted(p.name for p in images.iterdir())
    assert set(parts.image) == set(tokens.image)
    assert (out / "report.html").stat().st_size > 10_000  # drawn by the main process from every shard


def test_a_process_with_an_empty_shard_returns_the_merged_run(images, tmp_path, monkeypatch):
    """One image, two processes: process 1 has nothing to scan and returns what process 0 wrote
    (played here in one process, one rank after the other; the barriers have no one to wait for)."""
    out = tmp_path / "run"
    kw = dict(images=[str(images / "im00.png")], out=out, image_size=(H, W), progress=False, report=False)
    for rank in (0, 1):
        ctx = distributed.DistContext(rank, 2, "cpu")
        monkeypatch.setattr(distributed, "context", lambda ctx=ctx: ctx)
        res = scan("tiny-dinov2+sinks", resume=rank == 1, **kw)
        assert res.summary["distributed"]["images_per_process"] == [1, 0]
        assert res.summary["n_ok"] == 1 and set(res.tokens.image) == {"im00.png"}
    assert not (out / "progress.rank1.jsonl").exists()
    assert len(pd.read_parquet(out / "tokens.parquet")) == len(res.tokens)


def test_shards_are_disjoint_and_cover_every_item():
    items = [f"im{i}" for i in range(11)]
    shards = [distributed.shard_of(items, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(items)
    assert [len(s) for s in shards] == distributed.images_per_process(11, 3) == [4, 4, 3]


def test_a_single_process_under_accelerate_cpu_says_it_runs_alone(monkeypatch, caplog):
    # accelerate launch --cpu on one machine starts one process without WORLD_SIZE
    for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with caplog.at_level(logging.WARNING, logger="sinkscope"):
        assert distributed.context() is None
    assert "--multi_gpu --num_processes N" in caplog.text


def test_a_fresh_scan_removes_the_progress_logs_of_an_earlier_distributed_run(images, tmp_path):
    out = tmp_path / "run"
    scan("tiny-dinov2+sinks", images=[str(images / "im00.png")], out=out, progress=False, report=False)
    (out / "progress.rank1.jsonl").write_text(
        json.dumps([{"image": "im01.png", "status": "ok", "part": "x"}]) + "\n"
    )
    res = scan("tiny-dinov2+sinks", images=[str(images / "im00.png")], out=out, progress=False, report=False)
    assert not (out / "progress.rank1.jsonl").exists()
    assert res.summary["n_ok"] == 1 and "distributed" not in res.summary


# -- probe and flow under two processes -----------------------------------------------------------


def test_a_two_process_probe_merges_the_features_of_one_process(tmp_path):
    """13 images (one unreadable) in batches of 4: process 0 extracts batches 0 and 2, process 1
    batches 1 and 3; the main process merges them into the features of one process (cached),
    probes and writes the run."""
    data, cache, out = tmp_path / "data", tmp_path / "cache", tmp_path / "run"
    for i in range(6):
        for cls, cells in (("marked", [(1, 2), (3, 0)]), ("plain", [])):
            (data / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(paint_markers(photo(i, (32, 32)), cells)).save(data / cls / f"{i}.png")
    (data / "marked" / "bad.png").write_bytes(b"not an image")
    args = [
        "probe", "--model", "tiny-dinov2+sinks", "--dataset", str(data), "--groups", "cls,mean,sink",
        "--layers", "0,2", "--folds", "2", "--batch-size", "4", "--jobs", "1", "--out", str(out), "-q",
    ]  # fmt: skip
    r = _accelerate([str(BIN / "sinkscope")], *args, SINKSCOPE_CACHE=str(cache))
    assert r.returncode == 0, r.stderr[-3000:]
    one = probe(
        "tiny-dinov2+sinks",
        str(data),
        groups=["cls", "mean", "sink"],
        layers=[0, 2],
        folds=2,
        batch_size=4,
        cache=False,
        progress=False,
        n_jobs=1,
        out=tmp_path / "one",
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "probe.csv"), pd.read_csv(tmp_path / "one" / "probe.csv"), check_exact=True
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["distributed"]["num_processes"] == 2 and s["distributed"]["rank"] == 0
    assert s["distributed"]["images_per_process"] == [8, 5]
    assert s["features"]["failed"] == one.summary["features"]["failed"] and len(s["features"]["failed"]) == 1
    assert not (out / "feature-parts").exists() and s["features"]["cached"] is False
    # the merged features (cached by the main process) are those of one process: same arrays, same order
    (meta,) = cache.glob("features/*/meta.json")
    merged, single = GroupFeatures.load(meta.parent), one.features
    assert merged.names == single.names and list(merged.x) == list(single.x) and len(merged.names) == 12
    pd.testing.assert_frame_equal(merged.labels, single.labels)
    for k in single.x:
        np.testing.assert_array_equal(merged.x[k], single.x[k])
        np.testing.assert_array_equal(merged.n_tokens[k], single.n_tokens[k])
        np.testing.assert_array_equal(merged.pos[k], single.pos[k])


FLOW_TABLES = [
    "rollout.csv", "relevance.csv", "vit_attention_by_group.csv", "redundancy.csv", "visual_tokens.parquet",
    "attention_by_bin.csv", "attention_by_group.csv", "knockout.csv", "decode.csv", "attribution.csv",
    "relevancy.csv",
]  # fmt: skip


def _close(a, b, rel: float = 1e-6) -> bool:
    """Equal JSON values, floats to ``rel`` relative (nested dicts and lists compared item by item)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)
    return a == b


def test_a_two_process_flow_writes_the_tables_of_one_process(tmp_path):
    """tiny-llava with every analysis over 10 images (one prompt): the ViT analyses in batches of
    8 (process 0: 8 images, process 1: 2), the knockout pairs by first target, the decoded
    positions one by one; the main process merges every table into the rows of one process."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):
        cells = [c for c in CELLS[i % len(CELLS)] if c[0] < 4 and c[1] < 4]  # the 4 x 4 grid of 32 px
        Image.fromarray(paint_markers(photo(i, (32, 32)), cells)).save(folder / f"im{i:02d}.png")
    out = tmp_path / "run"
    args = [
        "flow", "--model", "tiny-llava+sinks", "--images", str(folder), "--window", "2",
        "--attribution-steps", "8", "--out", str(out), "-q",
    ]  # fmt: skip
    r = _accelerate([str(BIN / "sinkscope")], *args)
    assert r.returncode == 0, r.stderr[-3000:]
    one = tmp_path / "one"
    run_flow("tiny-llava+sinks", images=[str(folder)], window=2, attribution_steps=8, out=one, progress=False)
    for name in FLOW_TABLES:  # the same rows in the same order, the same values up to float rounding
        read = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
        # a process of the group runs torch with other thread counts than a lone process, so sums
        # of floats may round differently in the last digits (seen in CI on relevancy.csv), and a relative change - a difference of two close logits over
        # one of them - loses digits to cancellation: 1e-6 absolute on values of order 1e-3 (seen on knockout.csv)
        pd.testing.assert_frame_equal(read(out / name), read(one / name), rtol=1e-5, atol=1e-6, obj=name)
    s = json.loads((out / "summary.json").read_text())
    s1 = json.loads((one / "summary.json").read_text())
    for key in ("images", "redundancy", "knockout", "propagation", "attribution", "relevancy"):
        assert _close(s[key], s1[key]), key  # equal, floats up to rounding (see above)
    d = s["distributed"]
    assert d["num_processes"] == 2 and d["images_per_process"] == [8, 2]
    assert d["analyses"]["relevancy"].startswith("main process") and len(d["timings_per_process"]) == 2
    # each process had a share: images, a set of knockout pairs (first target: question / last), positions
    shares = d["share_per_process"]
    assert [x["images"] for x in shares] == [8, 2]
    assert [x["knockout_pairs"] for x in shares] == [1, 4] and "knockout_skipped" not in s
    n_decoded = len(pd.read_csv(one / "decode.csv").position.unique())
    assert (
        sum(x["decode_positions"] for x in shares) == n_decoded
        and min(x["decode_positions"] for x in shares) > 0
    )
    assert not (out / "parts").exists()


def test_a_flow_or_probe_under_several_processes_needs_an_output_folder(monkeypatch):
    monkeypatch.setattr(distributed, "context", lambda: distributed.DistContext(0, 2, "cpu"))
    with pytest.raises(SinkscopeError, match="flow under several processes needs an output"):
        run_flow("tiny-dinov2+sinks", analyses=("rollout",), progress=False)
    with pytest.raises(SinkscopeError, match="probe under several processes needs an output"):
        probe("tiny-dinov2+sinks", "digits", max_images=4, progress=False)

"""A run may only remove what it can prove it wrote: ``--out`` a user's folder is refused, an
earlier scan's folder is reused, and ``--overwrite`` is the explicit way to replace outputs."""

from __future__ import annotations

import json

import pytest

from sinkscope.cli import main


def _scan(out, *extra) -> int:
    return main(["scan", "--model", "tiny-dinov2+sinks", "--images", "embedded:2", "--out", str(out), "-q", *extra])


def test_scan_refuses_a_folder_it_did_not_write_and_keeps_every_file(tmp_path, capsys):
    user = tmp_path / "holiday"
    (user / "seen").mkdir(parents=True)
    (user / "seen" / "holiday.txt").write_text("keep me")
    (user / "parts").mkdir()
    (user / "parts" / "notes.md").write_text("mine")
    assert _scan(user) == 2  # refused before any work: a usage error (issue 28)
    err = capsys.readouterr().err
    assert "did not write" in err and str(user) in err and len(err.strip().splitlines()) == 1
    assert (user / "seen" / "holiday.txt").read_text() == "keep me"
    assert (user / "parts" / "notes.md").read_text() == "mine"
    assert not (user / "tokens.parquet").exists()


def test_scan_reruns_into_its_own_folder_and_overwrite_replaces_a_foreign_one(tmp_path):
    out = tmp_path / "run"
    assert _scan(out) == 0 and json.loads((out / ".sinkscope.json").read_text())["kind"] == "scan"
    assert _scan(out) == 0  # its own folder: fresh start allowed
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "other.txt").write_text("x")
    assert _scan(foreign, "--overwrite") == 0
    assert (foreign / "tokens.parquet").exists() and (foreign / "other.txt").read_text() == "x"


def test_scan_refuses_a_file_as_out(tmp_path, capsys):
    f = tmp_path / "report.txt"
    f.write_text("data")
    assert _scan(f) == 2  # a usage error, found before any work
    assert "is a file" in capsys.readouterr().err and f.read_text() == "data"


def test_a_scan_folder_from_an_earlier_version_is_still_recognised(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / ".sinkscope-run").write_text('{"kind": "scan", "written_by": "sinkscope"}')  # issue 11's marker
    (out / "seen").mkdir()
    (out / "seen" / "00000.png").write_bytes(b"old picture")
    assert _scan(out) == 0
    assert not (out / ".sinkscope-run").exists() and (out / ".sinkscope.json").exists()
    assert sorted(p.name for p in (out / "seen").iterdir()) == ["00000.png", "00001.png"]  # pictures of this run


def test_a_file_with_a_scans_name_no_longer_makes_a_folder_a_scans(tmp_path, capsys):
    user = tmp_path / "mine"
    (user / "seen").mkdir(parents=True)
    (user / "seen" / "a.txt").write_text("keep me")
    (user / "scan_config.json").write_text("not json {")  # was taken as a scan's: seen/ was deleted
    assert _scan(user) == 2
    assert str(user) in capsys.readouterr().err
    assert (user / "seen" / "a.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def scan_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scanrun") / "run"
    assert _scan(out, "--no-report") == 0
    return out


def test_report_never_overwrites_a_file_it_did_not_write(tmp_path, scan_run, capsys):
    mine = tmp_path / "thesis.html"
    mine.write_text("<html>my thesis</html>")
    assert main(["report", str(scan_run), "--out", str(mine)]) == 2
    assert "not a sinkscope report" in capsys.readouterr().err
    assert mine.read_text() == "<html>my thesis</html>"
    assert main(["report", str(scan_run), "--out", str(mine), "--overwrite"]) == 0
    assert "sinkscope" in mine.read_text()[:400]
    assert main(["report", str(scan_run), "--out", str(mine)]) == 0  # now its own page: replaced


def test_report_out_a_folder_fails_in_one_line_and_leaves_no_tmp(tmp_path, scan_run, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    assert main(["report", str(scan_run), "--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())

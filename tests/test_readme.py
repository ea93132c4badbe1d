"""The README's Python examples run, and every name it documents exists (issue 10).

Every fenced ``pycon`` block (``>>>`` examples with their real output) runs as a doctest and every
``python`` block is executed, in README order, in one shared namespace (a block may use what an
earlier one defined), from one scratch folder (``runs/...`` written by an example lands there).
A block may be skipped only with a visible marker on the line right before its fence::

    <!-- doctest: skip (needs a GPU and the hub model llava-hf/llava-1.5-7b-hf) -->

The reason is reported as the test's skip reason; a skipped block is still compiled. The only
acceptable reason is a model too slow for CI or not available offline (a hub model on a GPU); the
real DINOv2-S (offline, from a PyPI package, seconds to load) runs.

The name tests read the README's text: every ``ss.NAME`` / ``sinkscope.NAME`` reference resolves,
every function of the Python API table is exported by ``import sinkscope as ss``, so is every
result and config class the README names, and the functions it lists under ``sinkscope.flow`` and
``sinkscope.viz`` live in those packages.
"""

from __future__ import annotations

import doctest
import importlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import sinkscope as ss

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text(encoding="utf-8")
RUN_LANGS = {"python", "pycon"}
SKIP_MARK = re.compile(r"^<!--\s*doctest:\s*skip\s*\((?P<reason>.+)\)\s*-->$")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass(frozen=True)
class Block:
    number: int  # 1-based, among the README's python / pycon blocks
    line: int  # 1-based line of the first line of code
    lang: str
    source: str
    skip: str | None  # the reason of a `<!-- doctest: skip (...) -->` marker

    @property
    def name(self) -> str:
        return f"README.md block {self.number} (line {self.line})"


def readme_blocks(text: str = TEXT) -> list[Block]:
    """The ``python``/``pycon`` fenced blocks of ``text``, each with the skip marker before it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1).lower(), i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if lang in RUN_LANGS:
            before = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
            mark = SKIP_MARK.match(before)
            blocks.append(
                Block(len(blocks) + 1, start + 2, lang, "\n".join(lines[start + 1 : j]) + "\n",
                      mark.group("reason").strip() if mark else None)
            )
        i = j + 1
    return blocks


BLOCKS = readme_blocks()


class ReadmeSession:
    """One namespace and one scratch folder for all blocks; each block runs at most once."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.globs: dict = {"__name__": "README"}
        self.results: dict[int, str | None] = {}  # block number -> failure text, None when it passed

    def run(self, block: Block) -> str | None:
        if block.number not in self.results:
            self.results[block.number] = self._run(block)
        return self.results[block.number]

    def _run(self, block: Block) -> str | None:
        if block.lang == "python":
            try:
                exec(compile(block.source, block.name, "exec"), self.globs)
            except Exception as e:  # the block's own error, reported as the test failure
                return f"{block.name} raised {type(e).__name__}: {e}"
            return None
        test = doctest.DocTestParser().get_doctest(block.source, {}, block.name, str(README), block.line - 1)
        test.globs = self.globs  # DocTest copies its globs; the blocks share one namespace
        out = io.StringIO()
        runner = doctest.DocTestRunner(optionflags=FLAGS)
        res = runner.run(test, out=out.write, clear_globs=False)
        return f"{res.failed} of {res.attempted} examples failed:\n{out.getvalue()}" if res.failed else None


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> ReadmeSession:
    return ReadmeSession(tmp_path_factory.mktemp("readme"))


def _compile(block: Block) -> None:
    if block.lang == "python":
        compile(block.source, block.name, "exec")
        return
    for ex in doctest.DocTestParser().get_examples(block.source):
        compile(ex.source, block.name, "single")


def test_readme_has_runnable_blocks():
    assert sum(b.skip is None for b in BLOCKS) >= 5, [b.name for b in BLOCKS]
    # a marker must sit right before a block's fence: a stray one would skip nothing
    fenced_marks = sum(b.skip is not None for b in BLOCKS)
    assert TEXT.count("<!-- doctest:") == fenced_marks, "a doctest marker that is not right before a python/pycon block"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{b.number}-line{b.line}" for b in BLOCKS])
def test_readme_block(block: Block, session: ReadmeSession, monkeypatch):
    monkeypatch.chdir(session.folder)
    _compile(block)
    if block.skip is not None:
        pytest.skip(f"{block.name}: {block.skip}")
    earlier = [b for b in BLOCKS if b.number < block.number and b.skip is None]
    failed_before = [b.name for b in earlier if session.run(b) is not None]
    failure = session.run(block)
    if failure:
        hint = f" (earlier blocks failed too: {', '.join(failed_before)})" if failed_before else ""
        pytest.fail(failure + hint, pytrace=False)


# -- the names the README documents ---------------------------------------------------------------


def _resolve(dotted: str):
    """``sinkscope.a.b.c``: import the longest module prefix, then getattr the rest."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        for p in parts[k:]:
            obj = getattr(obj, p)
        return obj
    raise ModuleNotFoundError(dotted)


def _section(title: str) -> str:
    start = TEXT.index(f"\n## {title}\n")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start : end if end > 0 else None]


def _table_column(section: str, header: str) -> list[str]:
    """The cells of column ``header`` in the first markdown table of ``section`` that has it."""
    rows = [ln for ln in section.splitlines() if ln.startswith("|")]
    for k, row in enumerate(rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        if header in cells:
            col = cells.index(header)
            out = []
            for r in rows[k + 2 :]:
                cs = [c.strip() for c in re.split(r"(?<!\\)\|", r.strip().strip("|"))]
                out.append(cs[col])
            return out
    raise AssertionError(f"no table with a {header!r} column")


def test_ss_references_resolve():
    """Every ``ss.NAME`` (and ``ss.a.b``) in the README is an attribute of ``import sinkscope as ss``."""
    refs = sorted(set(re.findall(r"\bss\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", TEXT)))
    assert "scan" in refs and "run" in refs, refs
    missing = []
    for ref in refs:
        obj = ss
        try:
            for p in ref.split("."):
                obj = getattr(obj, p)
        except AttributeError:
            missing.append(f"ss.{ref}")
    assert not missing, f"the README names {missing}, which `import sinkscope as ss` does not expose"


def test_sinkscope_references_resolve():
    """Every dotted ``sinkscope.x.y`` name in the README is a module or an attribute of one."""
    # (?<!\.): a file name such as the marker ``.sinkscope.json`` is not a module path
    refs = sorted({r.rstrip(".") for r in re.findall(r"(?<!\.)\bsinkscope\.([A-Za-z_][\w.]*)", TEXT)} - {""})
    missing = []
    for ref in refs:
        try:
            _resolve(f"sinkscope.{ref}")
        except (ModuleNotFoundError, AttributeError):
            missing.append(f"sinkscope.{ref}")
    assert not missing, f"the README names {missing}, which do not exist"


def test_api_table_functions_are_exported():
    """The Python API table's functions (and the result/config classes the README names) are on ``ss``."""
    from sinkscope.models.base import Adapter

    cells = _table_column(_section("Python API"), "function")
    names = [m for c in cells for m in re.findall(r"`((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\(", c)]
    assert "load_model" in names and "scan" in names, names
    missing = []
    for name in names:
        head, *rest = name.split(".")
        if head == "sinkscope":
            ok = _exists(name)
        elif head == "ad":  # an adapter method
            ok = all(hasattr(Adapter, r) for r in rest)
        else:
            obj = ss
            ok = True
            for p in name.split("."):
                ok = ok and hasattr(obj, p)
                obj = getattr(obj, p, None)
        if not ok:
            missing.append(name)
    classes = sorted(set(re.findall(r"\b([A-Z]\w*(?:Result|Config))\b", TEXT)))
    assert {"ScanResult", "ProbeResult", "FlowResult", "DecodeResult", "ScanConfig"} <= set(classes), classes
    missing += [c for c in classes if not hasattr(ss, c)]
    assert not missing, f"the README documents {missing}, which `import sinkscope as ss` does not expose"


def _exists(dotted: str) -> bool:
    try:
        _resolve(dotted)
    except (ModuleNotFoundError, AttributeError):
        return False
    return True


def _in_package(package: str, name: str) -> bool:
    import pkgutil

    pkg = importlib.import_module(package)
    if _exists(f"{package}.{name}"):
        return True
    return any(
        _exists(f"{package}.{m.name}.{name}") for m in pkgutil.iter_modules(pkg.__path__) if m.name != "__main__"
    )


def test_flow_functions_exist():
    """The functions of the "Python: ... (modules ``sinkscope.flow.*``)" list live in ``sinkscope.flow``."""
    para = TEXT[TEXT.index("\nPython: `ss.flow.") : TEXT.index("(modules `sinkscope.flow.*`)")]
    names = re.findall(r"`(?:ss\.flow\.)?([A-Za-z_]\w*)\(", para)
    assert "knockout" in names and "decode_rate" in names, names
    missing = [n for n in names if not _in_package("sinkscope.flow", n)]
    assert not missing, f"the README lists {missing} under sinkscope.flow, where they do not exist"


def test_figure_functions_exist():
    """Every function of the figure table is in a module of ``sinkscope.viz``."""
    cells = _table_column(_section("Figures and the combined report"), "function")
    names = [m for c in cells for m in re.findall(r"`((?:\w+\.)?\w+)(?:\([^`]*\))?`", c)]
    assert "norm_bin_figure" in names, names
    missing = [n for n in names if not _in_package("sinkscope.viz", n)]
    assert not missing, f"the figure table names {missing}, which sinkscope.viz does not have"

"""Every docstring example in the package runs as a doctest (issue 10), each module from its own
scratch folder, so examples that write ``runs/...`` or ``report.html`` leave nothing behind.

Examples build what they need themselves: the tiny seeded models (``load_model("tiny-dinov2+sinks")``,
``"tiny-llava"``: a second to load), planted sinks painted with ``paint_markers``, small hand-made
tables, and the real DINOv2-S, which loads offline in seconds. The only example that may carry
``# doctest: +SKIP`` is one whose model is too slow for CI (the real mini-llava, hub models), and it
says so with a line containing ``skipped in the doctests`` right before it (within the 3 lines
above), or on the same line in a comment of its own before the directive, e.g.::

    (skipped in the doctests: loads the real mini-llava, ~30 s)

    >>> ad = load_model("mini-llava")      # doctest: +SKIP
    >>> ad = load_model("llava-hf/llava-1.5-7b-hf")   # skipped in the doctests: a hub model   # doctest: +SKIP

:func:`test_every_skip_says_why` checks that rule for the modules in :data:`SKIP_REASON_MODULES`.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import sinkscope

MODULES = sorted(m.name for m in pkgutil.walk_packages(sinkscope.__path__, "sinkscope.") if not m.name.endswith("__main__"))
ALL = ["sinkscope", *MODULES]

#: Modules whose ``+SKIP`` examples must say why (``name`` exactly, or ``package.*`` for a package
#: and everything under it). Other modules are being rewritten as this lands; set this to ``None``
#: to check every module of the package.
SKIP_REASON_MODULES: tuple[str, ...] | None = None  # every module
SKIP = re.compile(r"#\s*doctest:.*\+SKIP\b")
REASON = "skipped in the doctests"


def _checked(name: str) -> bool:
    if SKIP_REASON_MODULES is None:
        return True
    return any(
        name == entry or (entry.endswith(".*") and (name == entry[:-2] or name.startswith(entry[:-1])))
        for entry in SKIP_REASON_MODULES
    )


def skips_without_reason(path: str | Path) -> list[int]:
    """Line numbers of ``+SKIP`` directives in ``path`` with no ``skipped in the doctests`` line
    on the same line or within the 3 lines above."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [
        i + 1
        for i, line in enumerate(lines)
        if SKIP.search(line) and not any(REASON in ln for ln in lines[max(0, i - 3) : i + 1])
    ]


@pytest.mark.parametrize("name", ALL)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert res.failed == 0, f"{res.failed} of {res.attempted} examples in {name} failed (see the output above)"


@pytest.mark.parametrize("name", [n for n in ALL if _checked(n)])
def test_every_skip_says_why(name):
    path = importlib.import_module(name).__file__
    bad = skips_without_reason(path)
    assert not bad, (
        f"{path}: doctest +SKIP without a reason at line(s) {bad}; make the example run, or, for a model "
        f"too slow for CI only, say why right before it: '({REASON}: loads the real mini-llava, ~30 s)'"
    )


def test_skip_reason_modules_exist():
    """Every module named in :data:`SKIP_REASON_MODULES` exists (a renamed module is not silently unchecked)."""
    missing = [
        e for e in SKIP_REASON_MODULES or ()
        if not any(n == e or (e.endswith(".*") and n.startswith(e[:-1])) for n in ALL)
    ]
    assert not missing, f"SKIP_REASON_MODULES names modules that do not exist: {missing}"


def test_skip_reason_rule(tmp_path):
    """The rule itself, on a hand-made file."""
    f = tmp_path / "example.py"
    f.write_text(
        ">>> ok()                 # doctest: +SKIP\n"
        "\n"
        "(skipped in the doctests: loads the real mini-llava, ~30 s)\n"
        "\n"
        ">>> slow()               # doctest: +SKIP\n"
        ">>> also_slow()          # skipped in the doctests: a hub model   # doctest: +SKIP\n"
        "\n\n\n\n"
        ">>> far_below()          # doctest: +SKIP\n"
    )
    assert skips_without_reason(f) == [1, 11]

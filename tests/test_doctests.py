"""Every docstring example in the package runs as a doctest (from a scratch folder, so examples
that write ``runs/...`` leave nothing behind). Examples marked ``+SKIP`` still need a model, an
adapter or data defined outside the docstring; turning them into runnable examples is open work."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import sinkscope

MODULES = sorted(m.name for m in pkgutil.walk_packages(sinkscope.__path__, "sinkscope.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", ["sinkscope", *MODULES])
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert res.failed == 0, f"{res.failed} of {res.attempted} examples in {name} failed (see the output above)"

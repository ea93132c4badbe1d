"""Shared fixtures: marked images at a non-default size, tiny models with planted sinks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sinkscope.models.tiny import PATCH, paint_markers

# non-default input size: 48 x 40 px -> a 6 x 5 patch grid (the tiny models default to 32 x 32)
H, W = 48, 40
GRID = (H // PATCH, W // PATCH)
# per image, the planted patches (row, col); the last image has none
CELLS = [[(1, 2)], [(4, 0), (5, 4)], [(0, 0), (2, 3), (5, 1)], []]
VISION_TINY = ["tiny-clip", "tiny-siglip", "tiny-dinov2", "tiny-dinov2-reg", "tiny-vit", "tiny-llava"]


def photo(seed: int = 0, size=(H, W)) -> np.ndarray:
    """A real photograph (scikit-image) resized to ``size``, different crop per seed."""
    from skimage import data

    imgs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    return np.asarray(Image.fromarray(imgs[seed % len(imgs)]).resize((size[1], size[0]), Image.BICUBIC))


@pytest.fixture(scope="session")
def marked_images() -> list[np.ndarray]:
    return [paint_markers(photo(i), cells) for i, cells in enumerate(CELLS)]


@pytest.fixture
def eval_calls(monkeypatch):
    """Count (and optionally kill) the questions ``sinkscope eval`` asks: ``eval_calls(die_after=n)``
    patches ``answer_item`` to raise KeyboardInterrupt before the ``n+1``-th question (a killed
    run), ``eval_calls()`` only records; both return the list of ``(item id, variant)`` asked."""
    from sinkscope.evaluation import run as run_mod

    real = run_mod.answer_item

    def patch(die_after: int | None = None) -> list:
        calls: list = []

        def answer(ad, it, v, **kw):
            if die_after is not None and len(calls) == die_after:
                raise KeyboardInterrupt
            calls.append((it.id, v))
            return real(ad, it, v, **kw)

        monkeypatch.setattr(run_mod, "answer_item", answer)
        return calls

    return patch

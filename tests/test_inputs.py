"""Pictures and manifests as users hand them over: 16-bit and float pictures keep their real
range, animated GIFs say which frame is used, malformed manifests fail in one line naming the row."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from sinkscope import SinkscopeError
from sinkscope.data import image_items, read_manifest, to_rgb_uint8


def test_a_16_bit_grey_png_reaches_the_model_like_its_8_bit_conversion(tmp_path):
    rng = np.random.default_rng(0)
    grey16 = (rng.random((24, 32)) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray((grey16 // 257).astype(np.uint8)).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    a16 = image_items([tmp_path / "g16.png"])[0].load()
    a8 = image_items([tmp_path / "g8.png"])[0].load()
    assert a16.shape == (24, 32, 3) and a16.dtype == np.uint8
    # today's code saw an almost white picture (mean 254.7): the statistics must match the 8-bit one
    assert abs(float(a16.mean()) - float(a8.mean())) < 1.0 and np.abs(a16.astype(int) - a8).max() <= 1


def test_float_and_wide_integer_arrays_are_scaled_by_their_range():
    assert to_rgb_uint8(np.array([[0.0, 1.0]]))[0, :, 0].tolist() == [0, 255]
    assert to_rgb_uint8(np.array([[0, 32768, 65535]], np.uint16))[0, :, 0].tolist() == [0, 128, 255]
    assert to_rgb_uint8(np.array([[0, 100_000]], np.int64))[0, :, 0].tolist() == [0, 255]


def test_an_animated_gif_says_it_uses_the_first_frame(tmp_path, caplog):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="sinkscope"):
        arr = image_items([tmp_path / "anim.gif"])[0].load()
    assert "3 frames" in caplog.text and "first" in caplog.text
    assert arr[0, 0].tolist()[0] > 200  # red: the first frame


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"label": "cat"}'], "has no path column"),
        (['{"path": "a.png"}', '{"label": "dog"}'], "row 2: no 'path'"),
        (['{"path": null}'], "row 1: no 'path'"),
        (["42"], "line 1: expected a JSON object"),
        (['["a.png"]'], "line 1: expected a JSON object"),
    ],
)
def test_malformed_jsonl_rows_fail_in_one_line_naming_the_row(tmp_path, lines, message):
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(lines) + "\n")
    with pytest.raises(SinkscopeError, match=message.replace("[", r"\[")) as e:
        read_manifest(m)
    assert str(m) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["embedded:abc", "embedded:0", "embedded:-2"])
def test_a_bad_embedded_count_is_named(spec):
    with pytest.raises(SinkscopeError, match=f"--images {spec}"):
        image_items([spec])

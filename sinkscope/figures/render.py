"""Draw one figure from a saved run and write it as interactive HTML and static PNG.

HTML pages load plotly.js from one shared local copy (``OUT/plotly.min.js``, written once) so
they work offline without repeating 4.6 MB per figure; ``self_contained=True`` embeds it instead.
PNGs are exported by kaleido (>= 1) with the system Chromium; :class:`PngExporter` keeps one
kaleido browser open for all figures (about 0.2 s a figure instead of 2.5 s).

>>> from sinkscope.figures.spec import write_example_spec
>>> _ = write_example_spec("figs.toml")  # two figures of one tiny scan
>>> import sinkscope
>>> from sinkscope.figures.spec import load_figure_list
>>> spec = load_figure_list("figs.toml")
>>> run = spec.runs["tiny-scan"]
>>> _ = sinkscope.run(run.config, progress=False)            # into out/runs/tiny-scan next to the list
>>> fig = draw(spec.figure("tiny-norms"), run.config.out)
>>> write_html(fig, "out/tiny-norms.html", spec.figure("tiny-norms"))
PosixPath('out/tiny-norms.html')
"""

from __future__ import annotations

import hashlib
import html
import io
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from .._utils import SinkscopeError
from .kinds import KINDS, RunData
from .spec import FigureSpec

PLOTLY_JS = "plotly.min.js"
_CAPTION_COLOR = (68, 68, 68)


def draw(fig_spec: FigureSpec, run_dir: str | Path) -> Any:
    """The figure of ``fig_spec`` drawn from the saved results in ``run_dir`` (title/caption applied)."""
    fig = KINDS[fig_spec.kind].render(RunData(run_dir), **fig_spec.options)
    if fig_spec.title:
        fig.update_layout(title={"text": fig_spec.title, "x": 0.0, "xanchor": "left"})
    return fig


_FONTS = ("LiberationSans-Regular.ttf", "Arial.ttf", "DejaVuSans.ttf")


def _font(size: int):
    from PIL import ImageFont

    for name in _FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def add_caption(png: bytes, caption: str | None, scale: float = 1.0) -> bytes:
    """``png`` with ``caption`` set in a white strip under it (wrapped to the image width).

    Done on the image rather than in the plotly layout: a caption annotation collides with axis
    titles, sliders and constrained (square) axes, whose positions plotly decides at draw time.
    """
    if not caption:
        return png
    from PIL import Image, ImageDraw

    img = Image.open(io.BytesIO(png)).convert("RGB")
    font = _font(max(8, round(13 * scale)))
    pad = round(14 * scale)
    left = round(70 * scale)  # the figures' left margin
    width = img.width - left - pad
    lines: list[str] = []
    for para in caption.splitlines() or [""]:
        line = ""
        for word in para.split():
            trial = f"{line} {word}".strip()
            if line and font.getlength(trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    step = round(font.size * 1.35)
    out = Image.new("RGB", (img.width, img.height + pad + step * len(lines) + pad), "white")
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((left, img.height + pad + i * step), line, fill=_CAPTION_COLOR, font=font)
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def ensure_plotly_js(out: Path) -> Path:
    """Write (or refresh) the shared ``plotly.min.js`` in ``out`` from the installed plotly."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs().encode()
    p = out / PLOTLY_JS
    if (
        not p.exists()
        or p.stat().st_size != len(js)
        or hashlib.sha1(p.read_bytes()).digest() != hashlib.sha1(js).digest()
    ):
        _atomic_write(p, js)
    return p


def write_html(
    fig: Any, path: str | Path, fig_spec: FigureSpec, provenance: str = "", self_contained: bool = False
) -> Path:
    """One HTML page with the interactive figure, its caption and where it came from."""
    import plotly.io as pio

    path = Path(path)
    div = pio.to_html(
        fig,
        full_html=False,
        include_plotlyjs=True if self_contained else PLOTLY_JS,
        include_mathjax=False,
        config={"displaylogo": False, "responsive": True},
        default_width="100%",
        default_height=f"{fig_spec.height}px",
        div_id=f"fig-{fig_spec.name}",
    )
    cap = f"<figcaption>{html.escape(fig_spec.caption)}</figcaption>" if fig_spec.caption else ""
    prov = f"<p class='meta'>{html.escape(provenance)}</p>" if provenance else ""
    page = (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'><meta name='generator' content='sinkscope'>\n"
        f"<title>{html.escape(fig_spec.name)} - sinkscope</title>\n"
        "<style>body{font-family:Inter,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1250px;margin:auto;"
        "padding:1em;color:#222}figcaption{margin:.6em 0;line-height:1.4}.meta{color:#777;font-size:12px}</style>\n"
        f"</head>\n<body>\n<figure>\n{div}\n{cap}\n</figure>\n{prov}\n</body>\n</html>\n"
    )
    _atomic_write(path, page.encode("utf-8"))
    return path


class PngExporter:
    """Static PNG export through kaleido, one browser for all figures; use as a context manager.

    Kaleido finds Debian's ``/usr/bin/chromium`` on ``PATH`` by itself; set ``BROWSER_PATH`` to
    use another Chrome/Chromium binary.
    """

    def __init__(self) -> None:
        self._started = False

    def __enter__(self) -> PngExporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop kaleido's browser, if it was started."""
        if self._started:
            import kaleido

            try:
                kaleido.stop_sync_server(silence_warnings=True)
            finally:
                self._started = False

    def write(
        self, fig: Any, path: str | Path, width: int, height: int, scale: float, caption: str | None = None
    ) -> Path:
        """Write ``fig`` as a ``width`` x ``height`` PNG at ``scale`` (pixels = size x scale), ``caption`` under it."""
        import plotly.io as pio

        if not self._started:
            import kaleido

            if not chromium_available():
                raise SinkscopeError(
                    "PNG export needs Chrome or Chromium: `make browser` (Debian's chromium) or set "
                    "BROWSER_PATH; or pass --no-png"
                )
            kaleido.start_sync_server(silence_warnings=True)
            self._started = True
        path = Path(path)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            data = pio.to_image(fig, format="png", width=width, height=height, scale=scale)
        _atomic_write(path, add_caption(data, caption, scale))
        return path


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def chromium_available() -> bool:
    """Whether kaleido will find a Chrome/Chromium (``BROWSER_PATH``, ``PATH``, usual places, its own download)."""
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False) is not None
    except Exception:  # another choreographer: look on PATH ourselves
        if os.environ.get("BROWSER_PATH"):
            return Path(os.environ["BROWSER_PATH"]).exists()
        return any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome"))

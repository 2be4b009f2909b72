"""What a reader sees, checked from the drawn artists: the rules every figure of the analysis keeps
(issue 34; tests/test_look.py renders every figure of the toy, digits, regime and repeats sweeps
and the theory's Figures 1-3 through `problems`).

- size: the saved image (bbox_inches="tight", as analysis.outputs.save_figure saves) at most
  MAX_WIDTH wide (two paper columns) and MAX_HEIGHT tall, in the paper style;
- text: no two drawn texts (titles, labels, tick labels, legend and colour-bar entries, notes)
  overlap, each lies inside the saved image, and none lies across the frame of a panel (an
  inset's tick labels on its parent's axis line): a text is inside a panel or outside it;
- colour: no two series of one panel share a colour. A series is a line of two or more points
  with a line style; the lines of one series (a mean's segments, an ODE drawn in two parts) carry
  the same `gid` ("series ..."); greys and black are references (a floor, the minima), not series.

Only the texts the renderer draws count (a tick outside the view is not drawn): they are
recorded from the Agg renderer's draw_text while the figure is drawn.
"""

from __future__ import annotations

import itertools

import matplotlib
import matplotlib.axes
import matplotlib.colors
import matplotlib.lines
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg

MAX_WIDTH, MAX_HEIGHT = 7.0, 7.0  # inches: two columns of a paper, and most of a page's height
PAD = 0.1  # savefig's pad_inches around the tight box
OVERLAP = 0.5  # points: bounding boxes that share less than this (a glyph's antialiased edge) do not overlap
COLOUR_GAP = 0.02  # two series' RGB colours closer than this (Euclidean, 0..1 per channel) look the same


def drawn_texts(fig):
    """[(text artist, its box in display pixels)] of every non-empty text the figure draws, and the
    renderer; the figure is drawn once on an Agg canvas."""
    canvas = FigureCanvasAgg(fig) if not isinstance(fig.canvas, FigureCanvasAgg) else fig.canvas
    renderer = canvas.get_renderer()
    seen = {}
    original = renderer.draw_text

    def record(gc, x, y, s, prop, angle, ismath=False, mtext=None):
        if mtext is not None and str(s).strip():
            seen[id(mtext)] = mtext
        return original(gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

    renderer.draw_text = record
    try:
        fig.draw(renderer)
    finally:
        del renderer.draw_text
    return [(t, t.get_window_extent(renderer)) for t in seen.values()], renderer


def _name(text) -> str:
    s = text.get_text().replace("\n", " ")
    return repr(s if len(s) <= 40 else s[:37] + "...")


def _title(ax) -> str:
    return repr(ax.get_title() or ax.get_ylabel() or "a panel without a title")


def _series(ax) -> dict:
    """{series key: [colours]} of one panel's lines (see the module's docstring)."""
    out = {}
    for line in ax.get_lines():
        if not line.get_visible() or line.get_linestyle() in ("None", "", " ") or len(line.get_xdata()) < 2:
            continue
        r, g, b, _ = matplotlib.colors.to_rgba(line.get_color())
        if max(r, g, b) - min(r, g, b) < 0.02:  # grey or black: a reference line
            continue
        key = line.get_gid() if str(line.get_gid() or "").startswith("series") else id(line)
        out.setdefault(key, []).append((r, g, b))
    return out


def problems(fig, max_width: float = MAX_WIDTH, max_height: float = MAX_HEIGHT) -> list[str]:
    """Every rule of the module's docstring the figure breaks, one line each (empty: none)."""
    texts, renderer = drawn_texts(fig)
    dpi = fig.dpi
    box = fig.get_tightbbox(renderer).padded(PAD)  # inches, as savefig(bbox_inches="tight") cuts it
    out = []
    if box.width > max_width + 1e-6 or box.height > max_height + 1e-6:
        out.append(f"size {box.width:.2f} x {box.height:.2f} in: more than {max_width:g} x {max_height:g} in")
    canvas = box.transformed(fig.dpi_scale_trans)
    tol = OVERLAP * dpi / 72
    for t, b in texts:
        if b.x0 < canvas.x0 - tol or b.y0 < canvas.y0 - tol or b.x1 > canvas.x1 + tol or b.y1 > canvas.y1 + tol:
            out.append(f"text {_name(t)} leaves the figure")
    for (t1, b1), (t2, b2) in itertools.combinations(texts, 2):
        w = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
        h = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
        if w > tol and h > tol:
            out.append(f"text {_name(t1)} overlaps {_name(t2)}")
    panels = [ax for ax in fig.findobj(matplotlib.axes.Axes) if ax.get_visible()]  # insets too
    frames = [(ax, ax.get_window_extent(renderer)) for ax in panels if ax.axison]
    for t, b in texts:
        for ax, f in frames:
            inside = b.x0 >= f.x0 - tol and b.x1 <= f.x1 + tol and b.y0 >= f.y0 - tol and b.y1 <= f.y1 + tol
            apart = b.x1 <= f.x0 + tol or b.x0 >= f.x1 - tol or b.y1 <= f.y0 + tol or b.y0 >= f.y1 - tol
            if not inside and not apart:
                out.append(f"text {_name(t)} lies across the frame of {_title(ax)}")
    for ax in panels:
        series = _series(ax)
        colours = [np.array(c[0]) for c in series.values()]
        for c1, c2 in itertools.combinations(colours, 2):
            if np.linalg.norm(c1 - c2) < COLOUR_GAP:
                out.append(f"two series of {_title(ax)} share the colour {matplotlib.colors.to_hex(c1)}")
                break
    return out

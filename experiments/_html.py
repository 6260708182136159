"""A minimal HTML report: sections of text, tables and PNG figures (matplotlib, no pyplot).

Used by `experiments.compare_views`. The page carries a small script that, once every image has
loaded, records how many decoded correctly in `<body data-images-loaded="n/m">` and how many
are wider than the page (`data-images-overflowing`; figures scale to the page width), so a headless
browser (`--dump-dom`) can check the report without a human; `tests/test_compare_views.py` does.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from drm.checkpoint import atomic_write

_CHECK_IMAGES = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const good = images.filter((im) => im.complete && im.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = good + "/" + images.length;
  // figures wider than the page's text column would be cut off: count them
  const column = document.body.getBoundingClientRect();
  const wide = images.filter((im) => im.getBoundingClientRect().right > column.right + 0.5);
  document.body.dataset.imagesOverflowing = String(wide.length);
});
</script>
"""

_STYLE = """
<style>
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 0.2em; }
</style>
"""


@dataclass
class Report:
    """Sections of HTML written into one folder with their figures."""

    folder: Path
    title: str
    parts: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.parts.append(f"<p><code>{html.escape(text)}</code></p>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
            for row in rows
        )
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def grid(
        self,
        name: str,
        rows: Sequence[Sequence[Tensor | np.ndarray]],
        row_labels: Sequence[str],
        column_labels: Sequence[str],
        caption: str,
        signed: Sequence[bool] | None = None,
        signed_rows: Sequence[bool] | None = None,
    ) -> None:
        """A PNG grid of images (each (C, H, W) or (H, W)).

        Signed images (columns flagged in `signed`, and, when given, only in the rows flagged in
        `signed_rows`) use a diverging map centred at zero; the others are grey levels.
        """
        from matplotlib.figure import Figure

        n_rows, n_cols = len(rows), max(len(r) for r in rows)
        fig = Figure(figsize=(1.3 * n_cols + 0.8, 1.3 * n_rows + 0.4))
        axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
        for i, row in enumerate(rows):
            for j in range(n_cols):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(row):
                    ax.axis("off")
                    continue
                image = _as_image(row[j])
                diverging = signed is not None and signed[j]
                if signed_rows is not None:
                    diverging = diverging and signed_rows[i]
                if diverging:
                    bound = float(np.abs(image).max()) or 1.0
                    ax.imshow(image, cmap="RdBu_r", vmin=-bound, vmax=bound)
                else:
                    ax.imshow(image, cmap="gray")
                if i == 0 and j < len(column_labels):
                    ax.set_title(column_labels[j], fontsize=8)
                if j == 0 and i < len(row_labels):
                    ax.set_ylabel(row_labels[i], fontsize=8)
        fig.tight_layout()
        path = self.folder / f"{name}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
        self.figures.append(path.name)
        self.parts.append(
            f'<figure><img src="{html.escape(path.name)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def write(self) -> Path:
        page = (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}"
            f"</title>{_STYLE}</head><body><h1>{html.escape(self.title)}</h1>"
            + "\n".join(self.parts)
            + _CHECK_IMAGES
            + "</body></html>\n"
        )
        path = self.folder / "index.html"
        atomic_write(path, lambda tmp: tmp.write_text(page))
        return path


def _as_image(value: Tensor | np.ndarray) -> np.ndarray:
    array = value.detach().cpu().double().numpy() if isinstance(value, Tensor) else value
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    return array


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        # nan marks a statistic over an empty set (e.g. an AUC with no attacked image that the
        # CNN first classified correctly): say so instead of printing "nan"
        return "n/a (no images)" if math.isnan(value) else f"{value:.4g}"
    return str(value)

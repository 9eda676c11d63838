"""The report figure of the preprocess stage: a few films after each step, with their boxes.

One row per film, one column per step (original → windowed → aligned → trimmed → resized), from
:func:`physis.preprocess.stages`, so the figure shows exactly what the stage computes. Boxes are
mapped with the same matrices as the pixels: fractures in red, every other class in yellow.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from physis.images import read_gray  # noqa: E402
from physis.io import atomic_path  # noqa: E402
from physis.preprocess import stages, transform_boxes  # noqa: E402

BOX_COLOURS = {"fracture": "red"}
OTHER_COLOUR = "yellow"


def steps_figure(films: pd.DataFrame, boxes: pd.DataFrame, params: dict, path: str | Path) -> None:
    """Draw ``films`` (manifest rows: image_id, path) after each step of ``params`` into ``path``.

    With no film (every one rejected) the figure says so instead of failing the stage.
    """
    count = max(1, len(films))
    fig, axes = plt.subplots(count, 5, figsize=(12, 3.2 * count), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    if films.empty:
        axes[0, 0].text(0, 0.5, "no film survived preprocessing", transform=axes[0, 0].transAxes)
    for row, film in zip(axes, films.itertuples()):
        own = boxes[boxes["image_id"] == film.image_id]
        for ax, (name, image, matrix) in zip(row, stages(read_gray(film.path), params)):
            height, width = image.shape
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(name, fontsize=9)
            moved = transform_boxes(own, matrix, (0, 0, width, height))
            for cls, x, y, w, h in moved[["class", "x", "y", "w", "h"]].itertuples(index=False):
                # imshow puts pixel centres on integers; boxes use pixel corners
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, linewidth=1,
                                       edgecolor=BOX_COLOURS.get(cls, OTHER_COLOUR)))
        row[0].text(0, -0.04, film.image_id, transform=row[0].transAxes, fontsize=7, va="top")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)

"""Pictures a person looks at: the heatmap overlay beside the labelled region."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from PIL import Image  # noqa: E402

from .loader import PATCH_SIZE, Slide  # noqa: E402
from .regions import region_contours  # noqa: E402

HEATMAP = "viridis"  # perceptually uniform
DISPLAY_MAX_SIDE = 1600  # the mosaic is box-reduced to this before plotting (the figure shows ~800 px)
PREDICTED_COLOUR = "#00e5ff"
LABELLED_COLOUR = "#ff2d2d"


def overlay_png(slide: Slide, mosaic: np.ndarray, probability: np.ndarray, predicted: np.ndarray,
                title: str, subtitle: str) -> bytes:
    """PNG bytes: the mosaic with the probability heatmap and predicted contours, and, when the
    file names carry labels, a second panel with the labelled IDC region for comparison."""
    panels = 2 if slide.has_labels else 1
    height, width = mosaic.shape[:2]
    panel_width = 7.0
    panel_height = float(np.clip(panel_width * height / width, 2.5, 9.0))
    fig, axes = plt.subplots(1, panels, figsize=(panel_width * panels + 1.2, panel_height + 1.1), dpi=110,
                             squeeze=False, constrained_layout=True)
    rows, cols = slide.grid_shape
    extent = (0, cols * PATCH_SIZE, rows * PATCH_SIZE, 0)
    heat = np.ma.masked_invalid(slide.grid_values(probability))
    predicted_lines = region_contours(slide, predicted)
    factor = max(1, int(np.ceil(max(height, width) / DISPLAY_MAX_SIDE)))
    shown = np.asarray(Image.fromarray(mosaic).reduce(factor)) if factor > 1 else mosaic
    mosaic_extent = (0, width, height, 0)

    ax = axes[0, 0]
    ax.imshow(shown, extent=mosaic_extent, interpolation="antialiased")
    image = ax.imshow(heat, cmap=HEATMAP, vmin=0, vmax=1, alpha=0.55, extent=extent, interpolation="nearest")
    for line in predicted_lines:
        ax.plot(line[:, 0], line[:, 1], color=PREDICTED_COLOUR, linewidth=1.4)
    ax.set_title("Predicted IDC probability, regions outlined", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="IDC probability")

    if panels == 2:
        ax = axes[0, 1]
        labelled = slide.labels == 1
        ax.imshow(shown, extent=mosaic_extent, interpolation="antialiased")
        truth = np.ma.masked_equal(slide.grid_values(labelled.astype(float), fill=0.0), 0)
        ax.imshow(truth, cmap=ListedColormap([LABELLED_COLOUR]), alpha=0.4, extent=extent, interpolation="nearest")
        for line in region_contours(slide, labelled):
            ax.plot(line[:, 0], line[:, 1], color=LABELLED_COLOUR, linewidth=1.4)
        for line in predicted_lines:
            ax.plot(line[:, 0], line[:, 1], color=PREDICTED_COLOUR, linewidth=1.0, linestyle="--")
        ax.set_title("Labelled IDC (file names, red) vs predicted (cyan, dashed)", fontsize=10)
    for ax in axes[0]:
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()

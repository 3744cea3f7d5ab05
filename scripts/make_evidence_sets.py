"""Two labelled image folders built offline, for checking ``pipeline advise`` beside the digits.

* ``photos``: 7 classes x 60 JPEGs, random crops (2-8 % of the area, so many show only background or texture; flips, brightness) of
  photographs bundled with scikit-image: a cat, a coffee cup, an astronaut, a rocket, grass,
  gravel, brick. Photographs, close to ImageNet.
* ``charts``: 6 classes x 60 PNGs of matplotlib charts of random data (line, bar, scatter, pie,
  histogram, heat map): drawings, far from ImageNet photographs.

Deterministic for a seed. Run: ``python scripts/make_evidence_sets.py OUT_DIR``
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PER_CLASS = 60
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "grass", "gravel", "brick")
CHARTS = ("line", "bar", "scatter", "pie", "histogram", "heatmap")


def photos(out: Path, seed: int = 0) -> None:
    from skimage import data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        image = getattr(data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        h, w = image.shape[:2]
        folder = out / "photos" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            area = rng.uniform(0.02, 0.08) * h * w
            aspect = rng.uniform(0.75, 1.33)
            ch = int(min(h, np.sqrt(area / aspect)))
            cw = int(min(w, ch * aspect))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = image[y:y + ch, x:x + cw].astype(np.float32) * rng.uniform(0.7, 1.3)
            crop = np.clip(crop, 0, 255).astype(np.uint8)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            Image.fromarray(crop).resize((320, 240)).save(folder / f"{i:03d}.jpg", quality=90)


def charts(out: Path, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    for kind in CHARTS:
        folder = out / "charts" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            fig, ax = plt.subplots(figsize=(2.4, 2.4), dpi=100)
            n = int(rng.integers(4, 12))
            colour = rng.random(3) * 0.8
            if kind == "line":
                ax.plot(np.cumsum(rng.normal(size=n * 4)), color=colour)
            elif kind == "bar":
                ax.bar(range(n), rng.random(n), color=colour)
            elif kind == "scatter":
                ax.scatter(rng.random(n * 6), rng.random(n * 6), s=8, color=colour)
            elif kind == "pie":
                ax.pie(rng.random(n // 2 + 2))
            elif kind == "histogram":
                ax.hist(rng.normal(size=200), bins=n + 4, color=colour)
            else:
                ax.imshow(rng.random((n, n)), cmap=str(rng.choice(["viridis", "magma", "gray"])))
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
            plt.close(fig)
            Image.open(buffer).convert("RGB").save(folder / f"{i:03d}.png")


if __name__ == "__main__":
    root = Path(sys.argv[1])
    photos(root)
    charts(root)
    print(f"wrote {root}/photos and {root}/charts")

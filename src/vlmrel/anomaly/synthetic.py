"""Synthetic street scenes for the demo (SYNTHETIC data, not a benchmark).

Each scene is a small RGB image of known classes, loosely shaped like StreetHazards:

====  ==========  =============================================
id    class       appearance
====  ==========  =============================================
0     sky         blue gradient above a random horizon
1     road        grey, noisy, below the horizon
2     building    brown rectangles standing on the horizon
3     car         yellow discs on the road
4     pole        thin white vertical bars
5     anomaly     (test only) textured triangles/discs in colours no known class has
255   ignore      the bottom rows (the "ego vehicle"), black
====  ==========  =============================================

Training and validation scenes never contain the anomaly id; a share of the test scenes do,
the rest have none (which exercises the per-image convention's leave-out). Every scene is
drawn from ``np.random.default_rng([seed, split, index])``, so any subset is reproducible.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = ("sky", "road", "building", "car", "pole")
NUM_CLASSES = len(CLASS_NAMES)
ANOMALY_ID = 5
IGNORE_ID = 255
SPLITS = {"train": 0, "val": 1, "test": 2}

_BASE = {
    0: (110, 160, 225),
    1: (95, 95, 100),
    2: (150, 95, 70),
    3: (225, 200, 45),
    4: (235, 235, 235),
}
_ANOMALY_COLOURS = ((205, 40, 205), (40, 205, 70), (40, 215, 215), (240, 110, 20))


def _paint(img: np.ndarray, lab: np.ndarray, mask: np.ndarray, colour: np.ndarray, cls: int) -> None:
    img[mask] = colour
    lab[mask] = cls


def make_scene(
    rng: np.random.Generator, size: int = 64, with_anomaly: bool = False, max_anomalies: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image [3, size, size] uint8 and labels [size, size] uint8."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), dtype=np.float32)
    lab = np.zeros((h, w), dtype=np.uint8)
    jitter = rng.normal(0, 12, size=(6, 3))
    colour = {c: np.clip(np.array(_BASE[c], dtype=np.float32) + jitter[c], 0, 255) for c in _BASE}

    horizon = int(rng.integers(int(0.3 * h), int(0.5 * h)))
    sky = yy < horizon
    img[sky] = colour[0] * (0.85 + 0.3 * (yy[sky] / max(horizon, 1)))[:, None]
    lab[sky] = 0
    _paint(img, lab, ~sky, colour[1], 1)

    for _ in range(int(rng.integers(1, 4))):  # buildings
        bw = int(rng.integers(w // 8, w // 3))
        bh = int(rng.integers(h // 8, max(h // 8 + 1, horizon - 2)))
        x0 = int(rng.integers(0, w - bw))
        m = (xx >= x0) & (xx < x0 + bw) & (yy >= horizon - bh) & (yy < horizon + 2)
        _paint(img, lab, m, colour[2] * rng.uniform(0.85, 1.15), 2)

    for _ in range(int(rng.integers(0, 3))):  # poles
        x0 = int(rng.integers(0, w - 2))
        top = int(rng.integers(2, max(3, horizon - 4)))
        bottom = int(rng.integers(horizon + 2, h - 4))
        m = (xx >= x0) & (xx < x0 + 2) & (yy >= top) & (yy < bottom)
        _paint(img, lab, m, colour[4], 4)

    for _ in range(int(rng.integers(1, 4))):  # cars
        r = rng.uniform(size / 14, size / 7)
        cy = rng.uniform(horizon + r, h - 4 - r / 2)
        cx = rng.uniform(0, w)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (yy >= horizon)
        _paint(img, lab, m, colour[3], 3)

    if with_anomaly:
        for _ in range(int(rng.integers(1, max_anomalies + 1))):
            r = rng.uniform(size / 16, size / 8)
            cy = rng.uniform(horizon, h - 4 - r / 2)
            cx = rng.uniform(r, w - r)
            if rng.random() < 0.5:  # disc
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:  # upward triangle
                m = (yy <= cy + r) & (yy >= cy - r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
            base = np.array(_ANOMALY_COLOURS[int(rng.integers(len(_ANOMALY_COLOURS)))], dtype=np.float32)
            stripes = ((xx + yy) // 3) % 2 == 0
            img[m & stripes] = base
            img[m & ~stripes] = base * 0.55
            lab[m] = ANOMALY_ID

    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    ego = yy >= h - 3
    img[ego] = 0
    lab[ego] = IGNORE_ID
    return np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1), lab


def make_split(
    split: str, n: int, seed: int, size: int = 64, anomaly_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes of ``split``: images [n, 3, size, size] uint8, labels [n, size, size] uint8.

    In the test split the first ``round(anomaly_fraction * n)`` scenes (in a seeded order) carry
    planted unknown objects; train/val scenes never do.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    with_anomaly = np.zeros(n, dtype=bool)
    if split == "test":
        order = np.random.default_rng([seed, SPLITS[split], 10**6]).permutation(n)
        with_anomaly[order[: int(round(anomaly_fraction * n))]] = True
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    labels = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        images[i], labels[i] = make_scene(rng, size, bool(with_anomaly[i]))
    return images, labels

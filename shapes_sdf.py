"""A second renderer of the ten `shapes` kinds, written independently of shapes.py: the
"render" shift split (catalog entry `shapes-render`).

Every shape is an analytic signed distance field (negative inside, in pixels), so edges are
anti-aliased by pixel coverage instead of supersampling; its own proportions (star depth,
cross arm width, oval and diamond aspect, ring hole drawn per image around shapes.py's),
continuous sub-pixel positions, HLS colours, and backgrounds shapes.py never makes (smooth
value noise between two colours, radial vignettes), blur, and uniform instead of Gaussian
noise. Sizes, hues and drawing styles (filled or outlined) stay inside the training
distribution, so the split measures the change of renderer alone.

    data = shapes.generate("render", n=1000, seed=0, image_size=64)
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
from scipy import ndimage

import shapes

# (kind, proportions drawn per image: (low, high)); radius = circumradius in pixels
SHAPE_PROPORTIONS = {
    "circle": None, "square": None, "triangle": None, "hexagon": None, "pentagon": None,
    "star": (0.40, 0.50),          # inner / outer radius
    "cross": (0.28, 0.38),         # arm half-width / arm length
    "oval": (0.50, 0.62),          # minor / major axis
    "diamond": (0.55, 0.68),       # width / height
    "ring": (0.48, 0.56),          # hole / outer radius
}
TURNS = {"circle": 0, "ring": 0, "square": 12, "cross": 12, "diamond": 12}   # else any angle
RADIUS = (0.14, 0.34)              # inside shapes.TRAIN_RADIUS: only the renderer changes


def _ngon(k: int) -> np.ndarray:
    """Vertices of a regular k-gon, circumradius 1, a vertex up (a square stands on a side)."""
    start = math.pi / 4 if k == 4 else math.pi / 2
    return np.array([(math.cos(start + 2 * math.pi * j / k), -math.sin(start + 2 * math.pi * j / k))
                     for j in range(k)])


def _vertices(kind: str, prop: float) -> np.ndarray:
    if kind in ("square", "triangle", "hexagon", "pentagon"):
        return _ngon({"square": 4, "triangle": 3, "hexagon": 6, "pentagon": 5}[kind])
    if kind == "star":
        ang = [math.pi / 2 + math.pi * j / 5 for j in range(10)]
        return np.array([(math.cos(a) * (1 if j % 2 == 0 else prop), -math.sin(a) * (1 if j % 2 == 0 else prop))
                         for j, a in enumerate(ang)])
    if kind == "diamond":
        return np.array([(0, -1), (prop, 0), (0, 1), (-prop, 0)], float)
    if kind == "cross":
        w = prop
        arm = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w), (-w, -1)]
        return np.array(arm) / math.hypot(1, w)
    raise ValueError(f"no polygon for {kind!r}")


def polygon_distance(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance from points (x, y) to a closed polygon (negative inside): the nearest
    edge, and the sign from the crossing parity of a ray to +x."""
    best = np.full(x.shape, np.inf)
    inside = np.zeros(x.shape, bool)
    for (ax, ay), (bx, by) in zip(verts, np.roll(verts, -1, axis=0)):
        ex, ey = bx - ax, by - ay
        t = np.clip(((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        best = np.minimum(best, np.hypot(x - ax - t * ex, y - ay - t * ey))
        straddles = (ay > y) != (by > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = ax + (y - ay) * ex / np.where(ey == 0, 1, ey)
        inside ^= straddles & (x < x_cross)
    return np.where(inside, -best, best)


def signed_distance(kind: str, prop: float, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Distance in pixels for shape frame coordinates (x, y) in pixels, circumradius `radius`."""
    if kind == "circle":
        return np.hypot(x, y) - radius
    if kind == "ring":
        rho, inner = np.hypot(x, y), prop * radius
        return np.abs(rho - (radius + inner) / 2) - (radius - inner) / 2
    if kind == "oval":     # distance to an ellipse, scaled by the smaller axis (close enough)
        a, b = radius, prop * radius
        return (np.hypot(x / a, y / b) - 1) * b
    return polygon_distance(x / radius, y / radius, _vertices(kind, prop)) * radius


def shape_mask(shape: int, cx: float, cy: float, r: float, rot: float, size: int,
               prop: float | None = None) -> np.ndarray:
    """bool [size, size]: pixel centres inside the shape (the middle of its proportions)."""
    kind = shapes.SHAPES[shape]
    rng = SHAPE_PROPORTIONS[kind]
    prop = prop if prop is not None else (sum(rng) / 2 if rng else 0.0)
    return _distance(kind, prop, cx, cy, r, rot, size) <= 0


def _distance(kind, prop, cx, cy, r, rot, size):
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(rot), math.sin(rot)
    return signed_distance(kind, prop, c * dx + s * dy, -s * dx + c * dy, r)


def _hls_colour(rng) -> np.ndarray:
    """A colour in the training hue region (outside shapes.HELD_OUT_HUES), RGB 0-255."""
    lo, hi = shapes.HELD_OUT_HUES
    hue = (hi + rng.uniform(0, 360 - (hi - lo))) % 360
    if rng.random() < 0.15:
        return np.full(3, rng.uniform(10, 245))
    return 255 * np.array(colorsys.hls_to_rgb(hue / 360, rng.uniform(0.2, 0.8), rng.uniform(0.4, 1.0)))


def _pair(rng) -> tuple[np.ndarray, np.ndarray]:
    """(shape colour, background colour) at least shapes.MIN_CONTRAST apart."""
    fg = _hls_colour(rng)
    for _ in range(20):
        bg = _hls_colour(rng)
        if np.linalg.norm(fg - bg) >= shapes.MIN_CONTRAST:
            return fg, bg
    return fg, np.zeros(3) if fg.mean() > 127 else np.full(3, 255.0)


def _background(rng, size: int, bg: np.ndarray) -> np.ndarray:
    """Smooth value noise between bg and a lighter/darker bg, or a radial vignette."""
    other = np.clip(bg * rng.uniform(0.7, 1.3), 0, 255)
    if rng.random() < 0.5:
        grid = rng.random((4, 4))
        t = ndimage.zoom(grid, size / 4, order=3, mode="nearest")[:size, :size].clip(0, 1)
    else:
        yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size - rng.uniform(0.3, 0.7, 2)[:, None, None]
        t = np.clip(np.hypot(xx, yy) * 1.4, 0, 1)
    return bg * (1 - t[..., None]) + other * t[..., None]


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """One image (float RGB [size, size, 3]) and its shape index."""
    shape = int(rng.integers(0, len(shapes.SHAPES)))
    kind = shapes.SHAPES[shape]
    rng_prop = SHAPE_PROPORTIONS[kind]
    prop = rng.uniform(*rng_prop) if rng_prop else 0.0
    r = rng.uniform(*RADIUS) * size
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    turn = TURNS.get(kind, 180)
    rot = math.radians(rng.uniform(-turn, turn))
    fg, bg = _pair(rng)
    d = _distance(kind, prop, cx, cy, r, rot, size)
    if rng.random() < 0.35:                                    # outlined: a band around the edge
        d = np.abs(d + rng.uniform(0.05, 0.09) * r) - rng.uniform(0.05, 0.09) * r
    cover = np.clip(0.5 - d, 0.0, 1.0)[..., None]              # anti-aliased pixel coverage
    img = _background(rng, size, bg) * (1 - cover) + fg * cover
    img = ndimage.gaussian_filter(img, (rng.uniform(0, 0.7),) * 2 + (0,))
    return img + rng.uniform(-1, 1, img.shape) * rng.uniform(0, 12), shape


def generate_chunk(base_seed: int, chunk: int, m: int, size: int, cpi: int):
    """Images [chunk*CHUNK, chunk*CHUNK + m) of the render split, in shapes.generate's format."""
    seeds = np.random.SeedSequence([base_seed, chunk]).spawn(shapes.CHUNK)[:m]
    images, labels = np.empty((m, size, size, 3), np.uint8), np.empty(m, np.int64)
    for i, s in enumerate(seeds):
        img, labels[i] = render(np.random.default_rng(s), size)
        images[i] = np.clip(np.rint(img), 0, 255)
    captions = [[f"{shapes._article(shapes.SHAPES[k])}"] * cpi for k in labels]
    return images, captions, labels, np.full(m, -1, np.int64), {"shape": labels.copy()}

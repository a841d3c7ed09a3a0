"""Embedded, procedurally generated shapes image-caption dataset (tiny CLIP on CPU).

Usage: data = shapes.generate("train", n=40000, seed=0, image_size=64, workers=2)

Each image holds one coloured shape (10 kinds) on a plain background, rendered with PIL
at 2x resolution, box-downscaled and noised. Every image gets several natural-language
captions that always contain the exact shape name (= zero-shot class name). `TEMPLATES`
share no content word with the caption vocabulary, so zero-shot tests generalisation.
Generation is chunked (fixed chunk size, one SeedSequence per chunk), so results are
byte-identical for any worker count, and a prefix of a larger draw equals a smaller draw.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon",
                           "cross", "oval", "diamond", "pentagon", "ring")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 180, 40), "blue": (30, 70, 220),
    "yellow": (240, 220, 30), "orange": (245, 140, 20), "purple": (140, 50, 190),
    "white": (250, 250, 250), "black": (15, 15, 15)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "light blue": (165, 205, 240),
    "beige": (225, 210, 175), "dark green": (25, 75, 40)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
CLASSNAMES = list(SHAPES)
TEMPLATES: list[str] = [
    "a photo of a {}.", "an image showing a {}.", "a drawing of a {}.",
    "a rendering of a {}.", "a sketch of one {}.", "an illustration featuring a {}.",
    "a snapshot depicting a {}.", "a graphic of a {}."]

SPLIT_OFFSETS = {"train": 0, "val": 1_000_003}
CHUNK = 1000            # fixed: results must not depend on the worker count
NOISE_STD = 8.0         # in uint8 units
MIN_CONTRAST = 120.0    # min RGB distance between shape colour and background
RADIUS = (0.15, 0.25)   # nominal circumradius / image size, for small / large
SIZE_JITTER = 0.15
POS_JITTER = 3.0 / 64   # fraction of image size
PAD = 2.0 / 64

# --- caption vocabulary (shape word is always the exact class name) ---------------
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
BG_WORDS = {"grey": ("grey", "gray"), "light blue": ("light blue", "pale blue"),
            "beige": ("beige", "sand coloured"), "dark green": ("dark green", "deep green")}
POS_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left corner"),
    "top": ("at the top", "near the top", "along the top edge"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner"),
    "left": ("on the left", "near the left edge", "at the left side"),
    "center": ("in the middle", "in the center", "at the center"),
    "right": ("on the right", "near the right edge", "at the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    "bottom": ("at the bottom", "near the bottom", "along the bottom edge"),
    "bottom right": ("in the bottom right corner", "at the bottom right",
                     "in the lower right corner")}
# grouped by which optional slots ({pos}, {bg}) they use; {obj} = article + noun phrase
PATTERNS = {
    (False, False): ("{obj}", "there is {obj}", "picture of {obj}", "{np}"),
    (True, False): ("{obj} {pos}", "there is {obj} {pos}", "{pos}, {obj}",
                    "{obj} placed {pos}", "we can see {obj} {pos}"),
    (False, True): ("{obj} on {bga} background", "there is {obj} on {bga} background",
                    "{obj} against {bga} backdrop", "{bga} background with {obj}"),
    (True, True): ("{obj} {pos} on {bga} background", "picture of {obj} {pos} against {bga} backdrop",
                   "{bga} background with {obj} {pos}", "a single {np} sits {pos} on {bga} background")}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption_vocabulary() -> set[str]:
    """All words any training caption can contain (lowercase, letters only)."""
    texts = [p for group in PATTERNS.values() for p in group]
    texts += list(SHAPES) + list(COLORS) + ["a", "an"]
    texts += [w for ws in SIZE_WORDS.values() for w in ws]
    texts += [w for ws in BG_WORDS.values() for w in ws]
    texts += [p for ps in POS_PHRASES.values() for p in ps]
    words = set()
    for t in texts:
        words |= set(re.findall(r"[a-z]+", re.sub(r"\{[a-z_]+\}", " ", t.lower())))
    return words


def _allowed_backgrounds() -> list[list[int]]:
    bgs = np.array(list(BACKGROUNDS.values()), float)
    return [[j for j, b in enumerate(bgs) if np.linalg.norm(b - c) >= MIN_CONTRAST]
            for c in np.array(list(COLORS.values()), float)]


# --- geometry: unit polygons with circumradius <= 1, None = drawn as ellipse -------
def _regular(k: int, start_deg: float = -90.0) -> np.ndarray:
    t = np.deg2rad(start_deg) + 2 * np.pi * np.arange(k) / k
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _cross(w: float = 0.33) -> np.ndarray:
    p = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
         (-w, w), (-1, w), (-1, -w), (-w, -w)]
    return np.array(p, float) / math.hypot(1, w)


def _unit_polygons() -> list[np.ndarray | None]:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    oval = np.stack([np.cos(t), 0.55 * np.sin(t)], 1)
    diamond = np.array([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], float)
    return [None, _regular(4, 45), _regular(3), _star(), _regular(6), _cross(),
            oval, diamond, _regular(5), None]


# max rotation in degrees per shape (180 = any orientation)
MAX_ROT = (0, 15, 180, 180, 180, 15, 180, 15, 180, 0)
RING_HOLE = 0.52


def _render(shape: int, cx: float, cy: float, r: float, rot: float, fg, bg, size: int,
            polys) -> np.ndarray:
    """Draw one shape at 2x resolution (coordinates given in target pixels), box-downscale."""
    s = 2.0
    img = Image.new("RGB", (2 * size, 2 * size), bg)
    draw = ImageDraw.Draw(img)
    cx, cy, r = cx * s, cy * s, r * s
    if polys[shape] is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
        if SHAPES[shape] == "ring":
            h = r * RING_HOLE
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=bg)
    else:
        c, sn = math.cos(rot), math.sin(rot)
        p = polys[shape] @ np.array([[c, sn], [-sn, c]]) * r + (cx, cy)
        draw.polygon(p.ravel().tolist(), fill=fg)
    return np.asarray(img.reduce(2))


def _draw_params(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Vectorised per-image parameters for a full chunk (always CHUNK rows)."""
    p = {k: rng.integers(0, m, CHUNK) for k, m in
         (("shape", len(SHAPES)), ("color", len(COLORS)), ("size", 2), ("pos", 9))}
    allowed = _allowed_backgrounds()
    u = rng.random(CHUNK)
    p["bg"] = np.array([allowed[c][int(x * len(allowed[c]))] for c, x in zip(p["color"], u)])
    p["r"] = np.array(RADIUS)[p["size"]] * size * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER, CHUNK)
    p["rot"] = np.deg2rad(np.array(MAX_ROT)[p["shape"]] * rng.uniform(-1, 1, CHUNK))
    jitter = rng.uniform(-1, 1, (2, CHUNK)) * POS_JITTER * size
    pad = PAD * size
    for axis, grid, j in (("cx", p["pos"] % 3, jitter[0]), ("cy", p["pos"] // 3, jitter[1])):
        c = pad + p["r"] + grid * (size - 2 * pad - 2 * p["r"]) / 2 + j
        p[axis] = np.clip(c, p["r"], size - p["r"])
    return p


def _caption(shape: str, color: str, size: str, pos: str, bg: str, u: np.ndarray,
             shift: int = 0) -> str:
    """One caption from 8 uniforms in [0, 1): slot flags, pattern and word choices."""
    pick = lambda seq, x: seq[int(x * len(seq))]  # noqa: E731
    words = ([pick(SIZE_WORDS[size], u[2])] if u[0] < 0.5 else []) + \
            ([color] if u[1] < 0.7 else []) + [shape]
    np_ = " ".join(words)
    group = PATTERNS[(bool(u[3] < 0.55), bool(u[4] < 0.45))]
    pattern = group[(int(u[5] * len(group)) + shift) % len(group)]
    pos_text = pick(POS_PHRASES[pos], u[6])
    return pattern.format(obj=_article(np_), np=np_, pos=pos_text,
                          bga=_article(pick(BG_WORDS[bg], u[7])))


def _captions(shape, color, size, pos, bg, us: np.ndarray) -> list[str]:
    out: list[str] = []
    for u in us:
        cap = _caption(shape, color, size, pos, bg, u)
        for shift in range(1, 5):  # deterministic de-duplication
            if cap not in out:
                break
            cap = _caption(shape, color, size, pos, bg, u, shift)
        out.append(cap)
    return out


def _generate_chunk(base_seed: int, chunk: int, m: int, size: int, cpi: int):
    """Generate images [chunk*CHUNK, chunk*CHUNK + m) of a split; pure function of args."""
    p_rng, c_rng, n_rng = (np.random.default_rng(s) for s in
                           np.random.SeedSequence([base_seed, chunk]).spawn(3))
    p = _draw_params(p_rng, size)
    us = c_rng.random((m, cpi, 8))
    polys, cols, bgs = _unit_polygons(), list(COLORS.values()), list(BACKGROUNDS.values())
    color_names, bg_names = list(COLORS), list(BACKGROUNDS)
    images = np.empty((m, size, size, 3), np.uint8)
    captions = []
    for i in range(m):
        sh, co, bg = int(p["shape"][i]), int(p["color"][i]), int(p["bg"][i])
        images[i] = _render(sh, p["cx"][i], p["cy"][i], p["r"][i], p["rot"][i],
                            cols[co], bgs[bg], size, polys)
        captions.append(_captions(SHAPES[sh], color_names[co], SIZES[p["size"][i]],
                                  POSITIONS[p["pos"][i]], bg_names[bg], us[i]))
    noisy = images.astype(np.float32)
    noisy += n_rng.standard_normal(noisy.shape, dtype=np.float32) * NOISE_STD
    np.clip(np.rint(noisy, out=noisy), 0, 255, out=noisy)
    return noisy.astype(np.uint8), captions, p["shape"][:m].copy(), p["color"][:m].copy()


def _chunk_job(args):
    return _generate_chunk(*args)


@dataclass
class ShapesData:
    images: np.ndarray          # uint8 [N, H, W, 3]
    captions: list[list[str]]   # N lists of captions_per_image strings
    labels: np.ndarray          # int64 [N] shape index into SHAPES
    colors: np.ndarray          # int64 [N] colour index into list(COLORS)


def generate(split: str = "train", n: int = 1000, seed: int = 0, image_size: int = 64,
             captions_per_image: int = 4, workers: int = 0) -> ShapesData:
    """Generate `n` (image, captions, label, colour) samples of `split` ("train"/"val")."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; valid choices: {sorted(SPLIT_OFFSETS)}")
    base = seed + SPLIT_OFFSETS[split]
    jobs = [(base, c, min(CHUNK, n - c * CHUNK), image_size, captions_per_image)
            for c in range(-(-n // CHUNK))]
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    captions, labels, colors = [], np.empty(n, np.int64), np.empty(n, np.int64)

    def collect(results):
        for (_, c, m, *_), (im, caps, lab, col) in zip(jobs, results):
            sl = slice(c * CHUNK, c * CHUNK + m)
            images[sl], labels[sl], colors[sl] = im, lab, col
            captions.extend(caps)

    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            collect(pool.imap(_chunk_job, jobs))
    else:
        collect(map(_chunk_job, jobs))
    return ShapesData(images, captions, labels, colors)


if __name__ == "__main__":
    import time
    t0 = time.perf_counter()
    d = generate("train", n=40000, workers=2)
    print(f"40000 images in {time.perf_counter() - t0:.1f}s", d.images.shape, d.captions[0])

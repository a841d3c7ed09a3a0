"""Tests for the generated shapes image-caption dataset (shapes.py)."""
import hashlib
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shapes  # noqa: E402

STOP = {"a", "an", "the", "of"}


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.fixture(scope="module")
def train():
    return shapes.generate("train", n=2000, seed=0)


def test_api_constants():
    assert shapes.SHAPES == ("circle", "square", "triangle", "star", "hexagon",
                             "cross", "oval", "diamond", "pentagon", "ring")
    assert shapes.CLASSNAMES == list(shapes.SHAPES)
    assert len(shapes.COLOR_NAMES) >= 10 and len(shapes.TEMPLATES) >= 6
    assert all("{}" in t for t in shapes.TEMPLATES)
    assert sum(len(g) for g in shapes.PATTERNS.values()) >= 12


def test_shapes_and_dtypes():
    d = shapes.generate("val", n=37, seed=3, image_size=32, captions_per_image=3)
    assert d.images.shape == (37, 32, 32, 3) and d.images.dtype == np.uint8
    assert d.labels.shape == (37,) and d.labels.dtype == np.int64
    assert d.colors.shape == (37,) and d.colors.dtype == np.int64
    assert d.labels.min() >= 0 and d.labels.max() < len(shapes.SHAPES)
    assert d.colors.min() >= 0 and d.colors.max() < len(shapes.COLOR_NAMES)
    assert len(d.captions) == 37
    assert all(len(c) == 3 and all(isinstance(s, str) and s for s in c) for c in d.captions)


def test_determinism_and_workers():
    a = shapes.generate("train", n=2300, seed=5)
    b = shapes.generate("train", n=2300, seed=5)
    c = shapes.generate("train", n=2300, seed=5, workers=2)
    for other in (b, c):
        assert np.array_equal(a.images, other.images)
        assert np.array_equal(a.labels, other.labels)
        assert np.array_equal(a.colors, other.colors)
        assert a.captions == other.captions
    d = shapes.generate("train", n=2300, seed=6)
    assert not np.array_equal(a.images, d.images)


def test_prefix_stable():
    a = shapes.generate("train", n=1500, seed=1)
    b = shapes.generate("train", n=300, seed=1)
    assert np.array_equal(a.images[:300], b.images) and a.captions[:300] == b.captions


def test_every_class_appears(train):
    counts = np.bincount(train.labels[:1000], minlength=len(shapes.SHAPES))
    assert (counts > 0).all(), counts
    seen = {shapes.COLOR_NAMES[c] for c in train.colors[:1000]}
    assert seen == set(shapes.COLOR_NAMES) - {'cyan'}, seen       # cyan hues are held out (shapes-colour)


def test_captions_name_their_shape(train):
    for label, caps in zip(train.labels, train.captions):
        name = shapes.SHAPES[label]
        for cap in caps:
            assert re.search(rf"\b{name}\b", cap), (name, cap)
            others = _words(cap) & (set(shapes.SHAPES) - {name})
            assert not others, (name, cap)


def test_val_disjoint_from_train(train):
    val = shapes.generate("val", n=500, seed=0)
    h = lambda im: hashlib.sha1(im.tobytes()).digest()  # noqa: E731
    train_hashes = {h(im) for im in train.images}
    assert len(train_hashes) == len(train.images)
    assert not any(h(im) in train_hashes for im in val.images)


def test_templates_absent_from_caption_vocab(train):
    vocab = shapes.caption_vocabulary()
    seen = set().union(*(_words(c) for caps in train.captions for c in caps))
    assert seen <= vocab, seen - vocab
    for t in shapes.TEMPLATES:
        fixed = _words(t.replace("{}", " ")) - STOP
        assert fixed and not fixed & vocab, (t, fixed & vocab)


def test_invalid_split():
    with pytest.raises(ValueError) as e:
        shapes.generate("test", n=4)
    assert "train" in str(e.value) and "val" in str(e.value)

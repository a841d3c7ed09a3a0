"""The shapes splits (shapes.py, shapes_sdf.py): each one's definition, determinism for any
worker count, the prefix property, the catalog entries and the demo's report lines."""
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evalsets  # noqa: E402
import shapes  # noqa: E402
import shapes_sdf  # noqa: E402
import zeroshot  # noqa: E402

CATALOG, LABELS, TEMPLATES = zeroshot.load_catalog()
SHAPE_ENTRIES = [n for n, e in CATALOG.items() if e['type'] == 'shapes']
PARAM_SPLITS = [s for s in shapes.SPLIT_OFFSETS if s != 'render']     # drawn by shapes.py


@pytest.fixture(scope='module')
def drawn():
    """1 100 samples (two chunks) of every split at 32 px."""
    return {s: shapes.generate(s, n=1100, seed=0, image_size=32) for s in shapes.SPLIT_OFFSETS}


def _in_band(hsv):
    lo, hi = shapes.HELD_OUT_HUES
    return (hsv[:, 1] > 0) & (hsv[:, 0] >= lo) & (hsv[:, 0] < hi)


@pytest.mark.parametrize('split', list(shapes.SPLIT_OFFSETS))
def test_every_split_is_the_same_for_any_worker_count_and_a_prefix_of_a_larger_draw(split, drawn):
    two = shapes.generate(split, n=1100, seed=0, image_size=32, workers=2)
    small = shapes.generate(split, n=300, seed=0, image_size=32)
    one = drawn[split]
    assert np.array_equal(one.images, two.images) and one.captions == two.captions
    assert np.array_equal(one.labels, two.labels)
    assert np.array_equal(one.images[:300], small.images) and one.captions[:300] == small.captions
    assert (np.bincount(one.labels, minlength=10) > 60).all()         # every shape, about evenly
    assert not np.array_equal(one.images[:300], shapes.generate(split, n=300, seed=1, image_size=32).images)


@pytest.mark.parametrize('split', list(shapes.SPLIT_OFFSETS))
def test_every_caption_names_its_shape_and_no_other(split, drawn):
    for label, caps in zip(drawn[split].labels, drawn[split].captions):
        name = shapes.SHAPES[label]
        for cap in caps:
            assert re.search(rf'\b{name}\b', cap), (name, cap)
            assert not set(re.findall('[a-z]+', cap)) & (set(shapes.SHAPES) - {name}), (name, cap)


def test_held_out_hues_never_colour_a_training_image_and_colour_every_colour_shift_image(drawn):
    for split in ('train', 'val', 'size', 'style'):
        for key in ('fg', 'bg', 'fg2'):
            hsv = drawn[split].params[key]
            assert not _in_band(hsv).any(), (split, key)
            assert (hsv[:, 1] > 0).mean() > 0.7, (split, key)             # mostly chromatic
    p = drawn['colour'].params
    fg, bg = _in_band(p['fg']), _in_band(p['bg'])
    assert (fg | bg).all() and fg.mean() > 0.5 and bg.mean() > 0.5 and (fg & bg).mean() > 0.2
    # and the training captions never name those hues
    words = {w for caps in drawn['train'].captions for c in caps for w in re.findall('[a-z]+', c)}
    assert 'cyan' not in words and {'red', 'green', 'blue', 'grey', 'light', 'dark'} <= words


def test_size_split_is_smaller_and_larger_than_any_training_size(drawn):
    lo, hi = shapes.TRAIN_RADIUS
    (s_lo, s_hi), (l_lo, l_hi) = shapes.SHIFT_RADIUS
    assert s_hi < lo and hi < l_lo
    for split in ('train', 'val', 'colour', 'style'):
        r = drawn[split].params['radius']
        assert lo <= r.min() and r.max() <= hi, split
    r = drawn['size'].params['radius']
    assert ((r < lo) | (r > hi)).all() and (r < lo).mean() > 0.4 and (r > hi).mean() > 0.4
    assert shapes_sdf.RADIUS[0] >= lo and shapes_sdf.RADIUS[1] <= hi   # the renderer split: sizes seen


def test_shift_styles_are_never_drawn_in_training(drawn):
    assert not set(shapes.TRAIN_STYLES) & set(shapes.SHIFT_STYLES)
    for split in ('train', 'val', 'colour', 'size'):
        styles = {shapes.STYLES[i] for i in drawn[split].params['style']}
        assert styles == set(shapes.TRAIN_STYLES), split
    assert {shapes.STYLES[i] for i in drawn['style'].params['style']} == set(shapes.SHIFT_STYLES)


def test_styles_are_drawn_as_named():
    """A filled shape covers its mask; outlined and dashed ones cover less, dashed less than outlined."""
    mask = shapes.shape_mask(0, 32, 32, 20, 0.0, 64, 2)
    rng = np.random.default_rng(0)
    area = {style: sum(int(layer.sum()) for layer, which in
                       shapes._layers(style, mask, 64, 64, 40, rng, 2) if which == 'fg')
            for style in shapes.STYLES}
    assert area['filled'] == mask.sum()
    assert area['dashed'] < area['outlined'] < 0.5 * mask.sum()
    assert area['dotted'] < area['outlined'] and 0 < area['hatched'] < mask.sum()


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize('rot', [0.0, 0.2])
def test_the_second_renderer_draws_the_same_ten_shapes(rot):
    """Each shapes_sdf mask overlaps shapes.py's mask of the same parameters (IoU > 0.8) more
    than any other shape's: a nearest-shape classifier on masks names it right."""
    for k in range(len(shapes.SHAPES)):
        theirs = shapes_sdf.shape_mask(k, 31.3, 32.6, 20.0, rot, 64)
        ious = [_iou(theirs, shapes.shape_mask(j, 31.3, 32.6, 20.0, rot, 64)) for j in range(10)]
        assert ious[k] > 0.8 and int(np.argmax(ious)) == k, (shapes.SHAPES[k], np.round(ious, 2))


def test_colour_names():
    assert shapes.colour_name(0, 0.9, 0.9) == 'red' and shapes.colour_name(230, 0.9, 0.9) == 'blue'
    assert shapes.colour_name(100, 0.9, 0.3) == 'dark green' and shapes.colour_name(25, 0.9, 0.4) == 'brown'
    assert shapes.colour_name(0, 0, 0.1) == 'black' and shapes.colour_name(0, 0, 0.5) == 'grey'
    assert shapes.colour_name(180, 0.8, 0.8) == 'cyan' and shapes.colour_name(300, 0.4, 0.9) == 'light pink'
    rgb = shapes.hsv_to_rgb(np.array([[10.0, 0.5, 0.8], [200.0, 1.0, 0.4]]))
    assert np.allclose(shapes.rgb_to_hsv(rgb), [[10.0, 0.5, 0.8], [200.0, 1.0, 0.4]])


def test_catalog_has_one_shapes_entry_per_split():
    shifts = zeroshot.shift_sets('shapes', CATALOG)
    assert [CATALOG[n].get('split', 'val') for n in SHAPE_ENTRIES] == ['val', *shapes.SHIFT_SPLITS]
    assert shifts == SHAPE_ENTRIES[1:] and all(CATALOG[n]['shift_of'] == 'shapes' for n in shifts)
    for name in SHAPE_ENTRIES:
        assert LABELS[name] == shapes.CLASSNAMES and TEMPLATES[name] == shapes.TEMPLATES
        source, path = evalsets.locate(name, CATALOG[name], data_root='/nonexistent')
        assert path is None                                            # generated: no data root
        dataset, names, _ = evalsets.build(name, source, 32, 'zeroshot_classification',
                                           LABELS[name], TEMPLATES[name])
        sample = dataset[0]
        assert len(dataset) == CATALOG[name]['num_samples'] and sample['image'].shape == (3, 32, 32)
        assert 0 <= sample['label'] < len(names)


def test_the_demo_ends_with_the_shift_mean_then_the_held_out_line(capsys):
    import main
    assert main.DATASET_DEFAULTS['shapes']['zeroshot_datasets'] == SHAPE_ENTRIES
    assert main.UPSTREAM_DEFAULTS['zeroshot_datasets'] == ['shapes']
    live = {'shapes': {'top1': 97.0}, 'shapes-colour': {'top1': 80.0}, 'shapes-size': {'top1': 90.0},
            'shapes-style': {'top1': 70.0}, 'shapes-render': {'top1': 100.0}}
    main.report_zeroshot({'live': live, 'ema': live})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2:] == ['zero-shot top-1 (shapes shift splits, mean of 4): 85.0%',
                          'zero-shot top-1 (shapes held-out): 97.0%']
    assert len(lines) == 12 and lines[4] == 'zero-shot top-1 (shapes shift splits, mean of 4, ema weights): 85.0%'
    assert main.validation_log({'live': live})['shapes_shift_mean_top1'] == 85.0
    main.report_zeroshot({'live': {'shapes': {'top1': 50.0}, 'mnist': {'top1': 20.0}}})   # no shifts: as given
    assert capsys.readouterr().out.strip().splitlines() == ['zero-shot top-1 (shapes held-out): 50.0%',
                                                            'zero-shot top-1 (MNIST): 20.0%']

"""Unit tests of the data path: decoding (modes, caps, reduced-scale JPEG decode and its crop
statistics), caption cleaning, metadata files, make_dataset.py, seeds and the sampler."""
import argparse
import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

import augment
import datagen
import datasets
import make_dataset
import metadata
from decode import DecodeOptions, Skip, clean_caption, clean_captions, decode_image, draft_policy


def _builder(tokenizer, size, **kw):
    args = argparse.Namespace(image_size=size, base='CLIP', **kw)
    return augment.SampleBuilder.from_args(args, tokenizer)


def _photo(w=500, h=375, seed=0):
    return datagen.jpeg(seed, w, h, quality=92)


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize('kind, note', sorted(datagen.CONVERTED.items()))
def test_every_mode_becomes_rgb(kind, note):
    image, got = decode_image(datagen.image_bytes(kind, 3), kind, DecodeOptions())
    assert image.mode == 'RGB' and image.size == (64, 48) and got == note


def test_mode_conversions_keep_the_picture():
    rgb = np.asarray(Image.open(io.BytesIO(datagen.image_bytes('png', 3))).convert('RGB')).astype(int)
    cmyk, _ = decode_image(datagen.image_bytes('cmyk', 3), 'c', DecodeOptions())
    assert np.abs(np.asarray(cmyk).astype(int) - rgb).mean() < 8            # colours survive
    gray16 = np.full((4, 4), 128 * 257, np.uint16)                          # mid grey in 16 bits
    out, note = decode_image(datagen.encode(Image.fromarray(gray16), 'PNG'), 'g', DecodeOptions())
    assert note == 'image_16bit' and np.asarray(out).max() == 128           # PIL's convert clips to 255
    rgba = Image.new('RGBA', (4, 4), (10, 20, 30, 0))                       # fully transparent
    out, _ = decode_image(datagen.encode(rgba, 'PNG'), 'a', DecodeOptions())
    assert np.asarray(out).min() == 255                                     # composited on white
    pal = Image.new('P', (4, 4), 0)
    pal.putpalette([5, 5, 5] * 256)
    out, note = decode_image(datagen.encode(pal, 'PNG', transparency=0), 'p', DecodeOptions())
    assert note == 'image_palette' and np.asarray(out).min() == 255


@pytest.mark.parametrize('kind, reason', sorted((k, r) for k, r in datagen.BAD_IMAGES.items() if k != 'missing'))
def test_bad_images_raise_skip_with_reason(kind, reason):
    with pytest.raises(Skip) as e:
        decode_image(datagen.image_bytes(kind, 1), f'x/{kind}', DecodeOptions())
    assert e.value.reason == reason and f'x/{kind}' in str(e.value)


def test_pixel_cap_is_configurable():
    data = _photo(300, 200)
    assert decode_image(data, 'p', DecodeOptions(max_pixels=60_000))[0].size == (300, 200)
    with pytest.raises(Skip, match='too_large'):
        decode_image(data, 'p', DecodeOptions(max_pixels=59_999))


def test_draft_decodes_at_reduced_scale_only_when_every_crop_stays_sharp(tokenizer):
    data = _photo()                                                          # 500 x 375 JPEG
    small = draft_policy(_builder(tokenizer, 64))
    # smallest crop: area 0.5 x 500 x 375 at ratio 3/4 -> 265 px a side; 265 / 64 > 4
    assert small(500, 375) == (121, 91)
    image, _ = decode_image(data, 'p', DecodeOptions(draft=small))
    assert image.size == (125, 94)                                           # libjpeg 1/4 scale
    assert draft_policy(_builder(tokenizer, 224))(500, 375) is None           # 265 / 224 < 2
    assert decode_image(data, 'p', DecodeOptions(draft=draft_policy(_builder(tokenizer, 224))))[0].size == (500, 375)
    plain = augment.SampleBuilder.from_args(argparse.Namespace(image_size=64), tokenizer, plain_images=True)
    assert draft_policy(plain) is None                                       # no resize: full image


def test_draft_keeps_crop_statistics_and_content(tokenizer):
    """Crops are drawn in relative coordinates, so a 1/4-scale decode gives the same crop
    distribution; and the reduced decode looks like the full one downscaled."""
    rrc = T.RandomResizedCrop(64, scale=(0.5, 1.0))
    full, small = torch.zeros(3, 375, 500), torch.zeros(3, 94, 125)
    rel = []
    for s in range(2000):
        torch.manual_seed(s)
        a = rrc.make_params([full])
        torch.manual_seed(s)
        b = rrc.make_params([small])
        rel.append([a['height'] / 375, a['width'] / 500, (a['top'] + a['height'] / 2) / 375,
                    b['height'] / 94, b['width'] / 125, (b['top'] + b['height'] / 2) / 94])
    rel = np.array(rel)
    assert np.abs(rel[:, :3].mean(0) - rel[:, 3:].mean(0)).max() < 0.01
    assert np.abs(rel[:, :3].std(0) - rel[:, 3:].std(0)).max() < 0.01
    data = _photo()
    reduced, _ = decode_image(data, 'p', DecodeOptions(draft=draft_policy(_builder(tokenizer, 64))))
    reference = Image.open(io.BytesIO(data)).convert('RGB').resize(reduced.size, Image.BOX)
    assert np.abs(np.asarray(reduced, float) - np.asarray(reference, float)).mean() < 4


# ----------------------------------------------------------------------------- captions

def test_caption_cleaning():
    assert clean_caption('a <b>red</b>   dog &amp; cat\n', 'w') == ('a red dog & cat', None)
    assert clean_caption(b'caf\xc3\xa9', 'w') == ('café', None)
    text, note = clean_caption('word ' * 1000, 'w')
    assert note == 'caption_truncated' and len(text) <= 1000 and not text.endswith(' ')
    for raw, reason in [(None, 'caption_missing'), (float('nan'), 'caption_missing'),
                        ('  <i></i> ', 'caption_empty'), (b'\xff\xfe', 'caption_not_utf8'),
                        ('bad \udcff', 'caption_not_utf8'), (42, 'bad_record')]:
        with pytest.raises(Skip, match=reason):
            clean_caption(raw, 'w')
    assert clean_captions(['ok', '', None], 'w') == (['ok'], ['caption_dropped'])
    with pytest.raises(Skip, match='caption_empty'):
        clean_captions(['', None], 'w')                                  # the first reason wins


# ----------------------------------------------------------------------------- metadata

def test_records_round_trip_through_safe_npz(tmp_path):
    rows = [(12345678, 'title <b>one</b>', ''), (7, None, 'desc \udcff'), (99, 'a', 'b')]
    recs = metadata.records_from_rows(rows, 'yfcc15m', 'x')
    recs.save(tmp_path / 'm.npz')
    back = metadata.load_records(str(tmp_path / 'm.npz'), 'yfcc15m')
    assert [back.key(i) for i in range(3)] == [12345678, 7, 99]
    assert back.captions(0) == ['title <b>one</b>', ''] and back.captions(1)[1] == 'desc \udcff'
    with pytest.raises(Skip, match='caption_missing'):
        clean_caption(back.captions(1)[0], 'w')                          # None survives as None
    np.load(tmp_path / 'm.npz', allow_pickle=False)                      # no pickle inside
    with pytest.raises(metadata.DataError, match='holds yfcc15m records, not cc3m'):
        metadata.load_records(str(tmp_path / 'm.npz'), 'cc3m')


def test_pickles_need_allow_pickle(tmp_path):
    path = tmp_path / 'cc3m.npy'
    np.save(path, np.array([{'image_id': 'a.jpg', 'captions': ['x']}], dtype=object), allow_pickle=True)
    with pytest.raises(metadata.DataError, match='--allow-pickle'):
        metadata.load_records(str(path), 'cc3m')
    with pytest.warns(UserWarning, match='pickled metadata'):
        recs = metadata.load_records(str(path), 'cc3m', allow_pickle=True)
    assert recs.key(0) == 'a.jpg' and recs.captions(0) == ['x']
    structured = np.array([(5, 't', 'd')], dtype=[('index', '<i8'), ('title', '<U8'), ('description', '<U8')])
    np.save(tmp_path / 'y.npy', structured)                              # a safe structured array
    assert metadata.load_records(str(tmp_path / 'y.npy')).captions(0) == ['t', 'd']


@pytest.mark.parametrize('kind, rows, fragment', [
    ('cc3m', [{'path': 'a.jpg', 'text': 'x'}], "'image_id': <image path"),
    ('cc12m', [{'image_id': 1, 'captions': ['x']}], "'image_name': <image path"),
    ('yfcc15m', [{'a': 1}], '(index, title, description)'),
    ('yfcc15m', {'not': 'a list'}, 'expected a non-empty list of records'),
])
def test_wrong_structure_is_one_line_naming_the_expected_one(tmp_path, kind, rows, fragment):
    path = tmp_path / 'meta.json'
    path.write_text(json.dumps(rows))
    with pytest.raises(metadata.DataError) as e:
        metadata.load_records(str(path), kind)
    assert fragment in str(e.value) and '\n' not in str(e.value)


def test_malformed_rows_are_kept_as_bad_records(tmp_path):
    rows = [{'image_id': 'a.jpg', 'captions': ['x']}, {'image_id': None, 'captions': ['y']}, 'junk']
    with pytest.warns(UserWarning, match='2 of 3 records are malformed'):
        recs = metadata.records_from_rows(rows, 'cc3m', 'm')
    assert len(recs) == 3 and recs.bad_rows == 2 and recs.key(1) == ''


# ----------------------------------------------------------------------------- make_dataset

def test_make_dataset_yfcc15m_builds_clean_safe_metadata(tmp_path, capsys):
    np.save(tmp_path / 'flickr_unique_ids.npy', np.array([3, 5, 8, 9, 11], np.int64))
    (tmp_path / 'subset.tsv').write_text(''.join(f'{i}\t{1000 + i}\thash{i}\n' for i in (1, 3, 5, 9, 11)))
    rows = []
    for i in range(12):
        cols = [str(i)] + ['x'] * 24
        cols[8] = 'A+%3Cb%3Ebold%3C%2Fb%3E+title+http%3A%2F%2Fflic.kr%2Fx' if i == 3 else ('' if i == 9 else f'title+{i}')
        cols[9] = 'caf%C3%A9+%26amp%3B+more' if i == 3 else ''
        rows.append('\t'.join(cols))
    (tmp_path / 'yfcc100m_dataset.txt').write_text('\n'.join(rows) + '\n')
    out = tmp_path / 'yfcc15m.npz'
    make_dataset.main(['yfcc15m', '--ids', str(tmp_path / 'flickr_unique_ids.npy'),
                       '--subset', str(tmp_path / 'subset.tsv'),
                       '--yfcc100m', str(tmp_path / 'yfcc100m_dataset.txt'), '--out', str(out)])
    recs = metadata.load_records(str(out), 'yfcc15m')
    assert [recs.key(i) for i in range(len(recs))] == [3, 5, 11]          # 8: not captioned, 9: empty
    assert recs.captions(0) == ['A bold title', 'café & more'] and recs.captions(1) == ['title 5', '']
    assert '1 dropped (both empty)' in capsys.readouterr().out


def test_make_dataset_converts_upstream_pickles(tmp_path):
    rows = [(12, 't', 'd'), (13, 'u', '')]
    with open(tmp_path / 'yfcc15m.pkl', 'wb') as f:
        pickle.dump(rows, f)
    with pytest.raises(SystemExit, match='--allow-pickle'):
        make_dataset.main(['convert', str(tmp_path / 'yfcc15m.pkl'), str(tmp_path / 'y.npz')])
    with pytest.warns(UserWarning):
        make_dataset.main(['convert', str(tmp_path / 'yfcc15m.pkl'), str(tmp_path / 'y.jsonl'), '--allow-pickle'])
    lines = [json.loads(x) for x in open(tmp_path / 'y.jsonl')]
    assert lines[0] == {'index': 12, 'title': 't', 'description': 'd'}
    make_dataset.main(['convert', str(tmp_path / 'y.jsonl'), str(tmp_path / 'y.npz')])
    assert metadata.load_records(str(tmp_path / 'y.npz')).captions(1) == ['u', '']


# ----------------------------------------------------------------------------- seeds, sampler

def test_sampler_order_and_seeds_are_a_function_of_seed_epoch_rank():
    def run(epoch, start=0, rank=0, world=1, seed=3):
        s = datasets.ResumableSampler(103, seed=seed, rank=rank, world_size=world)
        s.set_epoch(epoch, start)
        return list(s)
    full = run(2)
    assert run(2, start=37) == full[37:]                                  # mid-epoch resume
    assert run(2) == full and run(3) != full and run(2, seed=4) != full
    assert sorted(i for i, _, _ in full) == list(range(103)) and {e for *_, e in full} == {2}
    seeds = {i: s for i, s, _ in full}
    assert all(seeds[i] == s for i, s, _ in run(2, rank=1, world=2))      # seed depends on (run, epoch, index)
    ranks = run(2, rank=0, world=2) + run(2, rank=1, world=2)
    assert {i for i, *_ in ranks} == set(range(103)) and len(ranks) == 104  # one sample repeated to even out
    assert len(set(seeds.values())) == 103 and {s for _, s, _ in run(3)}.isdisjoint(seeds.values())


def test_shapes_fast_path_equals_the_sample_builder(tokenizer):
    """The demo's samples: the builder's sample for the caption the demo's (seed, epoch)
    stream picks (bit-for-bit the stream of the original demo)."""
    args = argparse.Namespace(image_size=32, shapes_num_train=64, base='CLIP', seed=0)
    dataset = datasets.DATASETS.get('shapes').build(args, tokenizer)
    assert dataset.fast
    for i, seed, epoch in [(0, 1, 0), (63, 2 ** 62 + 7, 4)] + [(k * 3, k * 7919, k % 3) for k in range(20)]:
        fast = dataset[(i, seed, epoch)]
        choice = np.random.default_rng([0, epoch]).integers(0, 4, size=64)[i]
        caption = dataset.data.captions[i][choice]
        ref = dataset.builder(dataset.images[i], [caption], seed)
        assert fast['image'].dtype == torch.uint8 and torch.equal(fast['image'], ref['image'])
        assert torch.equal(fast['text'], ref['text'])
        assert torch.equal(ref['text'], tokenizer([caption])[0])
    views = argparse.Namespace(image_size=32, shapes_num_train=64, base='CL2L', seed=0, num_augs=2,
                               multicrop_resize=32, multicrop_max_scale=1.0, byol_augment=False,
                               blur_prob=0.5, solarize_prob=0.0, grayscale_prob=0.2, text_augment=False)
    cl2l = datasets.DATASETS.get('shapes').build(views, tokenizer)
    assert not cl2l.fast and cl2l[(3, 9, 0)]['image_views'].shape == (2, 3, 32, 32)


def test_unreadable_metadata_files_are_one_line_errors(tmp_path):
    (tmp_path / 'bad.json').write_text('[{"image_id": "a.jpg", ')
    (tmp_path / 'bad.pkl').write_bytes(pickle.dumps([(1, 'a', 'b')])[:-5])
    (tmp_path / 'bad.jsonl').write_text('{"image_id": "a.jpg", "captions": ["x"]}\nnot json\n')
    (tmp_path / 'meta.txt').write_text('x')
    cases = [('bad.json', {}, 'cannot read it as .json'), ('bad.pkl', {'allow_pickle': True}, 'cannot read it as .pkl'),
             ('bad.jsonl', {}, 'line 2: not JSON'), ('meta.txt', {}, "unknown format '.txt'; valid: .npz, .jsonl")]
    for name, kw, fragment in cases:
        with pytest.raises(metadata.DataError) as e:
            metadata.load_records(str(tmp_path / name), 'cc3m', **kw)
        assert fragment in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_parquet_metadata(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:                      # not a pinned dependency: the error says what to do
        (tmp_path / 'cc3m.parquet').write_bytes(b'PAR1')
        with pytest.raises(metadata.DataError, match='needs pyarrow'):
            metadata.load_records(str(tmp_path / 'cc3m.parquet'), 'cc3m')
        return
    pq.write_table(pa.table({'image_id': ['a.jpg'], 'captions': [['x', 'y']]}), tmp_path / 'cc3m.parquet')
    assert metadata.load_records(str(tmp_path / 'cc3m.parquet'), 'cc3m').captions(0) == ['x', 'y']

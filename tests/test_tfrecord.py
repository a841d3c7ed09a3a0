"""TFRecord data without TensorFlow: the record framing and CRCs, tf.train.Example parsing
(against tests/datagen.py's own encoder), img2dataset's tfrecord shards in training (gzip,
a corrupt record, a truncated shard, epoch length, one-line errors) and the `tfds` zero-shot
catalog type (a generated TFDS folder scores exactly as the same images in an ImageFolder).
Exact mid-epoch resume with workers: tests/test_data_order.py (tfrecord is a case there)."""
import gzip
import itertools
import json
import os
import random
import shutil

import pytest

import datagen
import datasets
import eval_linear
import eval_zeroshot
import evalsets
import main as train
import tfrecord
import zeroshot
from test_data_formats import TINY, _args, read_log
from zs_helpers import (EXPECTED, NUM_CLASSES, SAMPLES, CodedModel, make_imagefolder, make_tfds,
                        tiny_checkpoint, write_catalog)


# ----------------------------------------------------------------------------- record format

def test_crc32c_matches_the_check_value_and_the_test_encoder():
    assert tfrecord.crc32c(b'123456789') == tfrecord.crc32c_pure(b'123456789') == 0xE3069283   # RFC 3720
    assert datagen.crc32c(b'123456789') == 0xE3069283
    blob = random.Random(0).randbytes(5000)
    assert tfrecord.crc32c(blob) == tfrecord.crc32c_pure(blob) == datagen.crc32c(blob)
    assert tfrecord.masked_crc(blob) == datagen.masked_crc32c(blob)


def test_examples_from_the_test_encoder_parse_exactly():
    features = {'jpg': b'\xff\xd8 image', 'txt': 'a caption', 'width': 640, 'offset': -3,
                'scores': [0.5, -1.25], 'ids': [1, 2 ** 40], 'tags': ['a', 'b', 'c']}
    want = {'jpg': [b'\xff\xd8 image'], 'txt': [b'a caption'], 'width': [640], 'offset': [-3],
            'scores': [0.5, -1.25], 'ids': [1, 2 ** 40], 'tags': [b'a', b'b', b'c']}
    for packed in (True, False):                             # TensorFlow packs; both are valid wire
        assert tfrecord.parse_example(datagen.example_bytes(features, packed=packed)) == want
    with pytest.raises(ValueError, match='not a tf.train.Example'):
        tfrecord.parse_example(b'\x0a\xff\xff\xff')
    ours = tfrecord.encode_example(features)                  # the library's writer (protobuf)
    assert tfrecord.parse_example(ours) == want
    assert tfrecord.frame(ours) == datagen.frame_record(ours)


def _read(path):
    with tfrecord.open_shard(path) as f:
        return list(tfrecord.records(f, path))


def test_framing_checks_both_crcs_and_reads_gzip(tmp_path):
    payloads = [b'first', b'', b'third record' * 50]
    plain, packed = str(tmp_path / 'a.tfrecord'), str(tmp_path / 'a.tfrecord.gz')
    datagen.write_records(plain, payloads)
    datagen.write_records(packed, payloads, compress=True)
    assert _read(plain) == _read(packed) == [(p, True) for p in payloads]
    with tfrecord.open_shard(plain) as f:
        assert tfrecord.record_offsets(f, plain) == [at for at, _, _ in datagen.record_spans(plain)]
    (_, data, _), (second, _, _), (third, _, _) = datagen.record_spans(plain)
    blob = open(plain, 'rb').read()
    bad_data = bytearray(blob)
    bad_data[data + 2] ^= 1                                  # a data byte: that record only
    bad_length = bytearray(blob)
    bad_length[second] ^= 1                                  # a length byte: the framing is lost
    for name, content in (('data', bad_data), ('length', bad_length), ('cut', blob[:third + 20])):
        with open(tmp_path / name, 'wb') as f:
            f.write(content)
    assert _read(str(tmp_path / 'data')) == [(b'fisst', False), (b'', True), (payloads[2], True)]
    with pytest.raises(tfrecord.ShardError, match='record #1: length CRC mismatch'):
        _read(str(tmp_path / 'length'))
    with pytest.raises(tfrecord.ShardError, match='record #2: file cut short'):
        _read(str(tmp_path / 'cut'))


# ----------------------------------------------------------------------------- training

def _keys(reader, n, stream=0, streams=1):
    return [s['__key__'] for s in itertools.islice(reader._raw_stream(0, stream, streams), n)]


def test_gzip_shards_stream_the_same_samples(tmp_path, tokenizer):
    specs = datagen.specs(n_good=24)
    plain = datagen.write_tfrecord(str(tmp_path / 'plain'), specs, shards=3)
    mixed = datagen.write_tfrecord(str(tmp_path / 'mixed'), specs, shards=3, compressed=(0, 2))
    assert sorted(os.listdir(tmp_path / 'mixed')) == ['00000.tfrecord.gz', '00001.tfrecord', '00002.tfrecord.gz']
    with gzip.open(tmp_path / 'mixed' / '00000.tfrecord.gz') as f:
        assert f.read() == (tmp_path / 'plain' / '00000.tfrecord').read_bytes()
    a, b = (datasets.build_train_dataset(_args(f, train_num_samples=24), tokenizer) for f in (plain, mixed))
    assert _keys(a, 24) == _keys(b, 24) and len(set(_keys(a, 24))) == 24
    batch = next(iter(datasets.build_loader(b, _args(mixed, train_num_samples=24))[1]))
    assert batch['image'].shape == (4, 3, 32, 32) and all(
        tokenizer.decode(t).startswith('a photo of item') for t in batch['text'])


def test_corrupt_record_is_skipped_as_bad_record_and_training_goes_on(tmp_path, capsys):
    flags = datagen.write_tfrecord(str(tmp_path / 'data'), datagen.specs(n_good=24), shards=3, stats=True)
    shard = str(tmp_path / 'data' / '00001.tfrecord')
    _, data, length = datagen.record_spans(shard)[5]
    with open(shard, 'r+b') as f:                              # one byte of record #5's image
        f.seek(data + length - 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = str(tmp_path / 'out')
    train.main([*TINY, *flags, '--train-num-samples', '24', '--max-bad-fraction', '0.1', '--output-dir', out])
    (log,) = read_log(out)
    assert log['step'] == 6 and log['train_data_drawn'] == 24
    assert log['train_data_skipped'] == log['train_data_skipped_bad_record'] == 1
    assert f'skipped bad_record: {shard}:#5 (record #5: data CRC mismatch)' in capsys.readouterr().out


def test_truncated_shard_counts_once_and_its_good_records_are_read(tmp_path, tokenizer):
    flags = datagen.write_tfrecord(str(tmp_path / 'data'), datagen.specs(n_good=24), shards=3)   # 8 per shard
    shard = str(tmp_path / 'data' / '00001.tfrecord')
    _, data, _ = datagen.record_spans(shard)[4]
    os.truncate(shard, data + 10)                               # inside record #4: records 0-3 stay
    readable = [f'{s:05d}{i:04d}' for s, ids in ((0, range(8)), (1, range(8, 12)), (2, range(16, 24)))
                for i in ids]
    reader = datasets.build_train_dataset(_args(flags, train_num_samples=20), tokenizer)
    assert sorted(_keys(reader, 20)) == readable and reader._pending == ['bad_shard']
    out = str(tmp_path / 'out')
    train.main([*TINY, *flags, '--train-num-samples', '20', '--output-dir', out])
    (log,) = read_log(out)
    assert log['step'] == 5 and log['train_data_skipped'] == 0 and log['train_data_bad_shard'] == 1


@pytest.mark.parametrize('damage', ['length-crc', 'gzip-cut', 'not-tfrecord'])
def test_unreadable_shard_is_a_bad_shard(tmp_path, tokenizer, damage):
    """One pass over the shards: the records before the damage are read, the shard is
    reported once, the other shards are read whole; the stream counts it once per read."""
    flags = datagen.write_tfrecord(str(tmp_path / 'data'), datagen.specs(n_good=24), shards=3, compressed=(1,))
    if damage == 'length-crc':
        shard = str(tmp_path / 'data' / '00002.tfrecord')
        at, _, _ = datagen.record_spans(shard)[3]
        with open(shard, 'r+b') as f:
            f.seek(at + 1)
            f.write(b'\x7f')
    elif damage == 'gzip-cut':
        shard = str(tmp_path / 'data' / '00001.tfrecord.gz')
        os.truncate(shard, os.path.getsize(shard) * 2 // 3)
    else:
        shard = str(tmp_path / 'data' / '00002.tfrecord')
        with open(shard, 'wb') as f:
            f.write(b'this is not a TFRecord file at all' * 10)
    shards = sorted(str(p) for p in (tmp_path / 'data').iterdir())
    errors = []
    one_pass = list(tfrecord.shard_samples(iter([{'url': u} for u in shards]), lambda e: errors.append(e) or True))
    read_from = {s['__url__']: 0 for s in one_pass}
    for s in one_pass:
        read_from[s['__url__']] += 1
    assert len(errors) == 1          # gzip: decompression fails (EOFError); else the framing does
    assert isinstance(errors[0], EOFError) if damage == 'gzip-cut' else shard in str(errors[0])
    assert all(n == 8 for url, n in read_from.items() if url != shard)
    assert read_from.get(shard, 0) == {'length-crc': 3, 'not-tfrecord': 0}.get(damage, read_from.get(shard)) < 8
    reader = datasets.build_train_dataset(_args(flags, train_num_samples=16), tokenizer)
    first_pass = _keys(reader, len(one_pass))
    assert sorted(first_pass) == sorted(s['__key__'] for s in one_pass) and reader._pending == ['bad_shard']


def test_epoch_length_from_stats_files_or_the_flag(tmp_path, tokenizer):
    flags = datagen.write_tfrecord(str(tmp_path / 'd'), datagen.specs(n_good=24), shards=3, stats=True,
                                   compressed=(2,))
    assert len(datasets.build_train_dataset(_args(flags, train_num_samples=None), tokenizer)) == 24 // 4
    pattern = datagen.write_tfrecord(str(tmp_path / 'p'), datagen.specs(n_good=12), shards=3, pattern=True)
    assert pattern[-1].endswith('{00000..00002}.tfrecord')
    argv = [a for a in TINY if a not in ('--train-num-samples', '8')]
    with pytest.raises(SystemExit) as e:
        train.main([*argv, *pattern, '--output-dir', str(tmp_path / 'out')])
    assert str(e.value.code) == ("main.py: error: tfrecord: pass --train-num-samples (samples per epoch): "
                                 "no *_stats.json or sizes.json beside the shards to count them")
    assert len(datasets.build_train_dataset(_args(pattern, train_num_samples=12), tokenizer)) == 3


def test_remote_shards_are_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, '--dataset', 'tfrecord', '--root', 'gs://bucket/{00000..00003}.tfrecord',
                    '--output-dir', str(tmp_path / 'out')])
    message = str(e.value.code)
    assert message.startswith("main.py: error: tfrecord: reads local files, got 'gs://bucket/00000.tfrecord'")
    assert 'gcsfuse' in message and '\n' not in message


# ----------------------------------------------------------------------------- tfds zero-shot

def _run(tmp_path, tokenizer, entries, files=None):
    files = files or write_catalog(tmp_path, entries)
    return zeroshot.run(CodedModel(NUM_CLASSES, tokenizer), list(entries), tokenizer, 'cpu', 16,
                        batch_size=4, data_root=str(tmp_path), **files)


@pytest.mark.parametrize('path', ['tfds/toyset', 'tfds/toyset/1.0.0'])
def test_tfds_folder_scores_as_the_same_images_in_an_imagefolder(tmp_path, tokenizer, path):
    make_tfds(tmp_path / 'tfds', shards=3)
    make_imagefolder(tmp_path / 'folder')
    (tmp_path / 'tfds' / 'toyset' / '0.9.0').mkdir()               # an older version without files
    results = _run(tmp_path, tokenizer, {'as_tfds': {'type': 'tfds', 'path': path},
                                         'as_folder': {'type': 'imagefolder', 'path': 'folder'}})
    a, b = results['as_tfds'], results['as_folder']
    assert not a.skipped and a.num_samples == b.num_samples == len(SAMPLES)
    assert a.metrics == b.metrics and a.metrics['acc1'] == EXPECTED['acc1']
    assert a.source['type'] == 'tfds'


def test_tfds_label_names_from_labels_txt_and_missing_split_is_skipped(tmp_path, tokenizer):
    make_tfds(tmp_path / 'tfds')
    entries = {'toy': {'type': 'tfds', 'path': 'tfds/toyset'},
               'toy_test': {'type': 'tfds', 'path': 'tfds/toyset', 'split': 'test'}}
    files = write_catalog(tmp_path, entries)
    with open(files['labels'], 'w') as f:
        json.dump({}, f)                                        # class names: label.labels.txt
    results = _run(tmp_path, tokenizer, entries, files)
    assert results['toy'].metrics['acc1'] == EXPECTED['acc1']
    assert results['toy_test'].skipped == f'not found at {tmp_path}/tfds/toyset'
    dataset, names, _ = evalsets.build('toy', {'type': 'tfds', 'path': str(tmp_path / 'tfds/toyset')}, 16,
                                       'zeroshot_classification', None, ['a {}'])
    assert names == [f'cls{i}' for i in range(NUM_CLASSES)] and len(dataset) == len(SAMPLES)
    with pytest.raises(ValueError, match='labels.json has 3 class names, .*label.labels.txt 8'):
        evalsets.build('toy', {'type': 'tfds', 'path': str(tmp_path / 'tfds/toyset')}, 16,
                       'zeroshot_classification', ['a', 'b', 'c'], ['a {}'])


def test_eval_zeroshot_reads_a_tfds_catalog_entry(tmp_path):
    make_tfds(tmp_path / 'data')
    shutil.copytree(tmp_path / 'data' / 'toyset', tmp_path / 'data' / 'imagenet2012')
    files = write_catalog(tmp_path, {'gen': {'type': 'imagefolder', 'path': 'gone',
                                             'fallbacks': [{'type': 'tfds', 'path': 'imagenet2012'}]}})
    results = eval_zeroshot.main(['--resume', tiny_checkpoint(tmp_path / 'tiny.pt'), '--data-root',
                                  str(tmp_path / 'data'), '--output-dir', str(tmp_path / 'out'),
                                  '--batch-size', '4', '--image-size', '32', '--catalog', files['catalog'],
                                  '--labels', files['labels'], '--templates', files['templates']])
    assert 0 <= results['gen']['top1'] <= 100
    record = json.load(open(tmp_path / 'out' / 'gen_tiny_CLIP_TINYVIT_CLIP_32px_zeroshot_classification.json'))
    assert record['source'] == {'type': 'tfds', 'path': str(tmp_path / 'data' / 'imagenet2012')}
    assert record['num_samples'] == len(SAMPLES)


def test_catalog_reads_imagenet_from_tfds_and_linear_probe_finds_its_train_split():
    catalog, _, _ = zeroshot.load_catalog()
    assert {'type': 'tfds', 'path': 'imagenet2012'} in catalog['imagenet']['fallbacks']
    assert eval_linear._train_source({'type': 'tfds', 'path': 'x'}) == {'type': 'tfds', 'path': 'x', 'split': 'train'}


def test_damaged_samples_are_skipped_and_counted_in_evaluation(tmp_path, tokenizer, capsys):
    """A flipped byte in a TFDS record and a truncated / non-image file in an ImageFolder:
    each evaluation skips them, says how many, and scores the rest as if they were not there."""
    folder = make_tfds(tmp_path / 'tfds')
    shard = sorted(folder.glob('*.tfrecord-*'))[0]
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF                                     # inside the first record's payload
    shard.write_bytes(bytes(data))
    make_imagefolder(tmp_path / 'folder', samples=SAMPLES * 2)
    crowded = [d for d in sorted((tmp_path / 'folder').iterdir()) if len(list(d.glob('*.png'))) > 1]
    damaged = [sorted(d.glob('*.png'))[0] for d in crowded[:2]]     # no class left empty
    damaged[0].write_bytes(damaged[0].read_bytes()[:30])  # truncated PNG
    damaged[1].write_bytes(b'not an image at all')
    reference = tmp_path / 'reference'
    make_imagefolder(reference, samples=SAMPLES * 2)
    for p in damaged:
        (reference / p.parent.name / p.name).unlink()    # the same folder without those two
    results = _run(tmp_path, tokenizer, {'tfds': {'type': 'tfds', 'path': 'tfds/toyset'},
                                         'folder': {'type': 'imagefolder', 'path': 'folder'},
                                         'reference': {'type': 'imagefolder', 'path': 'reference'}})
    out = capsys.readouterr().out
    assert len(results['tfds'].unreadable) == 1 and results['tfds'].num_samples == len(SAMPLES) - 1
    assert 'data CRC mismatch' in results['tfds'].unreadable[0]
    assert len(results['folder'].unreadable) == 2 and results['folder'].num_samples == 2 * len(SAMPLES) - 2
    assert results['folder'].metrics == results['reference'].metrics
    assert 'tfds: 1 unreadable sample(s) skipped' in out and 'folder: 2 unreadable sample(s) skipped' in out


def test_a_set_of_only_damaged_samples_is_skipped_with_the_reason(tmp_path, tokenizer):
    make_imagefolder(tmp_path / 'folder')
    for p in (tmp_path / 'folder').rglob('*.png'):
        p.write_bytes(b'garbage')
    result = _run(tmp_path, tokenizer, {'folder': {'type': 'imagefolder', 'path': 'folder'}})['folder']
    assert result.skipped.startswith(f'no readable sample at {tmp_path}/folder ({len(SAMPLES)} unreadable, first: sample 0')

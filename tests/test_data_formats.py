"""Every training-data format, written in its real on-disk layout, trains through
main([...]); wrong roots, wrong metadata and unsafe files stop the run with one line."""
import itertools
import json
import os
import pickle
import tarfile

import numpy as np
import pytest

import datagen
import datasets
import main as train
import streaming

TINY = ['--model', 'CLIP_TINYVIT_CLIP', '--image-size', '32', '--batch-size', '4', '--epochs', '1',
        '--train-num-samples', '8', '--zeroshot-datasets', 'shapes', '--print-freq', '1']


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def test_every_registered_format_has_a_fixture_writer():
    assert set(datagen.WRITERS) == set(datasets.DATASETS), \
        "tests/datagen.py WRITERS needs one fixture writer per registered --dataset format"


@pytest.mark.parametrize('fmt', list(datasets.DATASETS))
def test_format_trains_two_steps(tmp_path, fmt):
    flags = datagen.WRITERS[fmt](str(tmp_path / 'data'), datagen.specs(n_good=13))
    out = str(tmp_path / 'out')
    results = train.main([*TINY, *flags, '--output-dir', out])
    assert 0 <= results['shapes']['top1'] <= 100
    (log,) = read_log(out)
    assert log['step'] == 2 and log['train_data_drawn'] == 8 and log['train_data_skipped'] == 0
    assert np.isfinite(log['train_loss'])
    assert os.path.isfile(os.path.join(out, 'checkpoint.pt'))


# ----------------------------------------------------------------------------- variants

def _args(flags, **kw):
    parser = train.utils.OneLineErrorParser('main.py', parents=[train.get_args_parser()])
    args = parser.parse_args([*TINY, *flags])
    train.resolve_args(args)
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def _first_batch(flags, tokenizer, **kw):
    args = _args(flags, **kw)
    dataset = datasets.build_train_dataset(args, tokenizer)
    sampler, loader = datasets.build_loader(dataset, args)
    sampler.set_epoch(0)
    return dataset, next(iter(loader))


@pytest.mark.parametrize('variant', ['yfcc-jsonl', 'yfcc-pkl', 'cc3m-jsonl', 'csv-comma', 'wds-stats'])
def test_metadata_variants_read_the_same_samples(tmp_path, tokenizer, variant):
    specs = datagen.specs(n_good=12)
    root = str(tmp_path / 'd')
    flags = {
        'yfcc-jsonl': lambda: datagen.write_yfcc(root, specs, 'jsonl'),
        'yfcc-pkl': lambda: datagen.write_yfcc(root, specs, 'pkl') + ['--allow-pickle'],
        'cc3m-jsonl': lambda: datagen.write_cc(root, specs, 'cc3m', 'jsonl'),
        'csv-comma': lambda: datagen.write_csv(root, specs, ',', 'path', 'caption'),
        'wds-stats': lambda: datagen.write_wds(root, specs, shards=3, stats=True),
    }[variant]()
    if variant == 'wds-stats':
        flags = [f for f in flags]                 # epoch length from the *_stats.json files
        args = _args(flags, train_num_samples=None)
        dataset = datasets.build_train_dataset(args, tokenizer)
        assert len(dataset) == 12 // 4
        return
    dataset, batch = _first_batch(flags, tokenizer)
    assert len(dataset) == 12
    assert batch['image'].shape == (4, 3, 32, 32) and batch['text'].shape == (4, 77)
    texts = {tokenizer.decode(t) for t in batch['text']}
    assert all(t.startswith('a photo of item') for t in texts)
    assert batch['_data']['counts'][0] == 4


# ----------------------------------------------------------------------------- errors

def _fails(tmp_path, flags, fragment, code=None):
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, *flags, '--output-dir', str(tmp_path / 'out')])
    message = str(e.value.code) if code is None else ''
    if code is not None:
        assert e.value.code == code
    return message


@pytest.mark.parametrize('fmt', [f for f, spec in datasets.DATASETS.items()           # formats reading files
                                 if spec.needs_root or spec.needs_metadata])
def test_wrong_root_stops_at_start_naming_the_layout(tmp_path, fmt):
    specs = datagen.specs(n_good=8)
    data, elsewhere = str(tmp_path / 'data'), str(tmp_path / 'elsewhere')
    os.makedirs(elsewhere)
    flags = datagen.WRITERS[fmt](data, specs)
    if '--root' in flags:        # every root (merged: each '---' part) moved; a shard pattern keeps its name
        i = flags.index('--root')
        flags[i + 1] = datasets.MERGE_SEP.join(
            elsewhere if os.path.isdir(part) else os.path.join(elsewhere, os.path.basename(part))
            for part in flags[i + 1].split(datasets.MERGE_SEP))
    else:
        flags += ['--root', elsewhere]       # csv: images resolved against the wrong folder
    message = _fails(tmp_path, flags, None)
    parts = {'merged': ('cc3m', 'cc12m', 'yfcc15m')}.get(fmt, (fmt,))     # merged: a part's layout
    assert message.startswith('main.py: error: ') and '\n' not in message, message
    assert any(f'expected {datasets.DATASETS[p].layout}' in message for p in parts), message
    if 'probed samples are unusable' in message:
        assert 'first: ' in message and elsewhere in message      # names the first failing path


@pytest.mark.parametrize('case, fragment', [
    ('cc3m-gets-coco-json', "expected a non-empty list of records"),
    ('yfcc-gets-cc3m-records', '(index, title, description)'),
    ('coco-gets-a-list', "'annotations': [{'image_id', 'caption'}]"),
    ('tarpairs-gets-a-list', "{'0-1000': '00000000_0_1000.tar.gz', ...}"),
    ('csv-wrong-separator', "no column 'filepath' (--csv-img-key)"),
    ('cc3m-pickle-without-flag', '--allow-pickle'),
])
def test_wrong_metadata_is_one_line_naming_the_expected_structure(tmp_path, case, fragment):
    specs = datagen.specs(n_good=8)
    data = str(tmp_path / 'data')
    if case == 'cc3m-gets-coco-json':
        coco = datagen.write_coco(data, specs)
        flags = ['--dataset', 'cc3m', '--root', data, '--metadata', coco[-1]]
    elif case == 'yfcc-gets-cc3m-records':
        cc = datagen.write_cc(data, specs, 'cc3m', 'jsonl')
        os.makedirs(os.path.join(data, 'images'))
        flags = ['--dataset', 'yfcc15m', '--root', data, '--metadata', cc[-1]]
    elif case == 'coco-gets-a-list':
        flags = datagen.write_coco(data, specs)
        with open(flags[-1], 'w') as f:
            json.dump([{'image_id': 1, 'caption': 'x'}], f)
    elif case == 'tarpairs-gets-a-list':
        flags = datagen.write_tarpairs(data, specs)
        with open(flags[-1], 'w') as f:
            json.dump(['00000000_0_50.tar.gz'], f)
    elif case == 'csv-wrong-separator':
        flags = datagen.write_csv(data, specs, sep=',')[:-2]          # comma file read as TSV
    else:
        flags = datagen.write_cc(data, specs, 'cc3m', 'npy')
    message = _fails(tmp_path, flags, None)
    assert message.startswith('main.py: error: ') and fragment in message and '\n' not in message, message


@pytest.mark.parametrize('argv, fragment', [
    (['--dataset', 'cc3m'], '--dataset cc3m needs --root'),
    (['--dataset', 'yfcc15m', '--root', '.'], '--dataset yfcc15m needs --metadata'),
    (['--dataset', 'coco', '--root', '.', '--metadata', '/no/such.json'], "no such file '/no/such.json'"),
    (['--dataset', 'merged', '--root', 'a---b', '--metadata', 'x'], "as many '---'-separated entries"),
    (['--dataset', 'webdataset'], f"valid: {', '.join(datasets.DATASETS)}"),
    (['--max-bad-fraction', '2'], '--max-bad-fraction must be in [0, 1]'),
    (['--caption-sampling', 'all'], "choose from 'single', 'multi'"),
])
def test_bad_data_flags_fail_before_any_work(tmp_path, capsys, argv, fragment):
    with pytest.raises(SystemExit) as e:
        train.main([*argv, '--output-dir', str(tmp_path / 'never')])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not os.path.exists(tmp_path / 'never')


def test_wds_needs_an_epoch_length(tmp_path):
    flags = datagen.write_wds(str(tmp_path / 'd'), datagen.specs(n_good=8))
    argv = [a for a in TINY if a not in ('--train-num-samples', '8')]
    with pytest.raises(SystemExit) as e:
        train.main([*argv, *flags, '--output-dir', str(tmp_path / 'out')])
    assert 'pass --train-num-samples' in str(e.value.code)


# ----------------------------------------------------------------------------- tarpairs metadata

def test_tarpairs_trains_from_the_metadata_cvnets_writes(tmp_path):
    """cvnets' img_text_tar code unpickles {start id: archive, ..., -1: total pairs} (its
    README's '0-1000' keys are not what it reads): main.py trains from that file."""
    flags = datagen.write_tarpairs(str(tmp_path / 'data'), datagen.specs(n_good=13), per_archive=5,
                                   form='cvnets')
    with open(flags[-1], 'rb') as f:
        assert pickle.load(f) == {0: '00000000_0_5.tar.gz', 5: '00000000_5_10.tar.gz',
                                  10: '00000000_10_13.tar.gz', -1: 13}
    out = str(tmp_path / 'out')
    train.main([*TINY, *flags, '--allow-pickle', '--output-dir', out])
    (log,) = read_log(out)
    assert log['step'] == 2 and log['train_data_drawn'] == 8 and log['train_data_skipped'] == 0


def _tarpairs_meta(tmp_path, table, name='meta.pkl'):
    path = str(tmp_path / name)
    if name.endswith('.json'):
        with open(path, 'w') as f:
            json.dump(table, f)
    else:
        with open(path, 'wb') as f:
            pickle.dump(table, f)
    return path


A, B, C = '00000000_0_5.tar.gz', '00000000_5_10.tar.gz', '00000000_10_13.tar.gz'


@pytest.mark.parametrize('table, name', [
    ({0: A, 5: B, 10: C, -1: 13}, 'meta.pkl'),
    ({-1: 13, 0: A, 5: B, 10: C}, 'meta.pkl'),                          # -1 anywhere (cvnets pops it)
    ({0: A, 5: B, 10: C, -1: 13}, 'PATH_OF_METADATA_FILE'),             # any name: a pickle by its bytes
    ({np.int64(0): A, np.int64(5): B, np.int64(10): C, -1: np.int64(13)}, 'meta.pkl'),
    ({'0': A, '5': B, '10': C, '-1': 13}, 'meta.json'),                 # the same dict as JSON
    ({'0-5': A, '10-13': C, '5-10': B}, 'meta.json'),                   # README's id ranges
    ({'0-5': A, '5-10': B, '10-13': C}, 'meta.pkl'),
])
def test_tarpairs_metadata_forms_list_the_archives_in_id_order(tmp_path, table, name):
    archives, total = streaming.tarpairs_shards('root', _tarpairs_meta(tmp_path, table, name), True)
    assert archives == [os.path.join('root', a) for a in (A, B, C)] and total == 13


@pytest.mark.parametrize('table, fragment', [
    ({0: A, 10: C, 5: B, -1: 13}, 'start ids must ascend from 0 in file order'),      # non-monotonic
    ({5: A, 10: B, -1: 13}, 'start ids must ascend from 0'),
    ({0: A, 5: B, 10: C}, 'need the entry -1: <total pairs>'),                       # no total
    ({0: A, 5: B, -1: '13'}, 'need the entry -1: <total pairs>'),                    # total not an int
    ({0: A, 5: B, -1: True}, 'need the entry -1: <total pairs>'),
    ({0: A, 5: B, -1: 5}, 'stay below the total -1: 5'),
    ({0: A, 5: 7, -1: 13}, 'the archive of 5 is 7, not a file name'),
    ({0.0: A, -1: 13}, "all integer start ids (plus -1: total pairs) or all id ranges 'a-b', got 0.0"),
    ({0: A, '5-10': B, -1: 13}, "all id ranges 'a-b', got 0"),                       # mixed forms
    ({'0-5': A, '5-10': None}, "the archive of '5-10' is None"),
    ([A, B], "wrong structure (got ['00000000_0_5.tar.gz', '00000000_5_10.tar.gz'])"),
    ({}, 'wrong structure (got {})'),
])
def test_malformed_tarpairs_metadata_is_one_line(tmp_path, table, fragment):
    specs = datagen.specs(n_good=8)
    flags = datagen.write_tarpairs(str(tmp_path / 'data'), specs, per_archive=5, form='cvnets')
    flags[-1] = _tarpairs_meta(tmp_path, table)
    message = _fails(tmp_path, [*flags, '--allow-pickle'], None)
    assert message.startswith('main.py: error: tarpairs ') and fragment in message, message
    assert '\n' not in message and "{0: '00000000_0_1000.tar.gz'" in message


def test_tarpairs_pickle_needs_allow_pickle_and_must_be_whole(tmp_path):
    flags = datagen.write_tarpairs(str(tmp_path / 'data'), datagen.specs(n_good=8), form='cvnets',
                                   meta_name='PATH_OF_METADATA_FILE')
    message = _fails(tmp_path, flags, None)                              # no --allow-pickle
    assert 'is a pickle' in message and 'pass --allow-pickle' in message and '\n' not in message
    os.truncate(flags[-1], os.path.getsize(flags[-1]) // 2)
    message = _fails(tmp_path, [*flags, '--allow-pickle'], None)
    assert 'cannot read it as a pickle' in message and '\n' not in message, message


# ----------------------------------------------------------------------------- broken shards

def _cut_inside_sample(shard, k):
    """Truncate a write_wds shard inside the image of its sample k (k samples stay whole)."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()                                   # KEY.jpg/png, KEY.txt, KEY.json
    os.truncate(shard, members[3 * k].offset_data + 10)
    return shard


def test_truncated_wds_shard_counts_once_and_its_good_samples_are_read(tmp_path, tokenizer, capsys):
    """A shard cut inside a member: webdataset calls the error handler twice for it (member
    read, then tar expander); main.py logs bad_shard 1 and trains on every readable sample."""
    flags = datagen.write_wds(str(tmp_path / 'data'), datagen.specs(n_good=24), shards=3)   # 8 per shard
    shard = _cut_inside_sample(str(tmp_path / 'data' / '00001.tar'), 4)
    readable = [f'{s:05d}{i:04d}' for s, ids in ((0, range(8)), (1, range(8, 12)), (2, range(16, 24)))
                for i in ids]
    reader = datasets.build_train_dataset(_args(flags, train_num_samples=20), tokenizer)
    first_pass = [s['__key__'] for s in itertools.islice(reader._raw_stream(0, 0, 1), 20)]
    assert sorted(first_pass) == readable
    assert reader._pending == ['bad_shard']                          # counted once
    capsys.readouterr()
    out = str(tmp_path / 'out')
    train.main([*TINY, *flags, '--train-num-samples', '20', '--output-dir', out])
    (log,) = read_log(out)
    assert log['step'] == 5 and log['train_data_drawn'] == 20 and log['train_data_skipped'] == 0
    assert log['train_data_bad_shard'] == 1                          # a second pass would read it again
    printed = [line for line in capsys.readouterr().out.splitlines() if 'skipped bad_shard' in line]
    assert len(printed) == 1 and shard in printed[0], printed


def test_truncated_shard_read_by_every_stream_counts_once(tmp_path, tokenizer):
    """Fewer shards than streams: every stream reads every shard (keeping every k-th sample);
    of the 3 streams that read the truncated shard, one counts it."""
    flags = datagen.write_wds(str(tmp_path / 'data'), datagen.specs(n_good=16), shards=2)   # 8 per shard
    _cut_inside_sample(str(tmp_path / 'data' / '00001.tar'), 4)
    reader = datasets.build_train_dataset(_args(flags, train_num_samples=12), tokenizer)
    keys = [s['__key__'] for stream in range(3) for s in itertools.islice(reader._raw_stream(0, stream, 3), 4)]
    assert len(set(keys)) == 12 and reader._pending == ['bad_shard']

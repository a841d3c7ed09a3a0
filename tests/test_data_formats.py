"""Every training-data format, written in its real on-disk layout, trains through
main([...]); wrong roots, wrong metadata and unsafe files stop the run with one line."""
import json
import os

import numpy as np
import pytest

import datagen
import datasets
import main as train

TINY = ['--model', 'CLIP_TINYVIT_CLIP', '--image-size', '32', '--batch-size', '4', '--epochs', '1',
        '--train-num-samples', '8', '--zeroshot-datasets', 'shapes', '--print-freq', '1']


def _merged(root, specs):
    """Upstream merged_opendata: cc3m.npy---cc12m.npy---yfcc15m.pkl, roots joined the same way."""
    parts = [datagen.write_cc(os.path.join(root, 'cc3m'), specs[:5], 'cc3m'),
             datagen.write_cc(os.path.join(root, 'cc12m'), specs[5:9], 'cc12m'),
             datagen.write_yfcc(os.path.join(root, 'yfcc'), specs[9:], 'pkl')]
    return ['--dataset', 'merged_opendata', '--root', '---'.join(p[3] for p in parts),
            '--metadata', '---'.join(p[5] for p in parts), '--allow-pickle']


LAYOUTS = {
    'yfcc15m': lambda r, s: datagen.write_yfcc(r, s, 'npz'),
    'cc3m': lambda r, s: datagen.write_cc(r, s, 'cc3m', 'npy') + ['--allow-pickle'],
    'cc12m': lambda r, s: datagen.write_cc(r, s, 'cc12m', 'jsonl'),
    'merged': _merged,
    'csv': datagen.write_csv,
    'coco': datagen.write_coco,
    'folder': datagen.write_folder,
    'wds': datagen.write_wds,
    'tarpairs': lambda r, s: datagen.write_tarpairs(r, s, per_archive=5),
}


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize('fmt', sorted(LAYOUTS))
def test_format_trains_two_steps(tmp_path, fmt):
    flags = LAYOUTS[fmt](str(tmp_path / 'data'), datagen.specs(n_good=13))
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


@pytest.mark.parametrize('fmt', ['yfcc15m', 'cc3m', 'csv', 'coco', 'folder', 'wds', 'tarpairs'])
def test_wrong_root_stops_at_start_naming_the_layout(tmp_path, fmt):
    specs = datagen.specs(n_good=8)
    data, elsewhere = str(tmp_path / 'data'), str(tmp_path / 'elsewhere')
    os.makedirs(elsewhere)
    flags = LAYOUTS[fmt](data, specs)
    i = flags.index('--root') if '--root' in flags else None
    if fmt == 'csv':
        flags += ['--root', elsewhere]               # images resolved against the wrong folder
    elif fmt == 'wds':
        flags[i + 1] = os.path.join(elsewhere, '{00000..00003}.tar')
    else:
        flags[i + 1] = elsewhere
    message = _fails(tmp_path, flags, None)
    expected = {'yfcc15m': 'images/XX/YYY.zip', 'cc3m': "'image_id': path", 'csv': "columns 'filepath'",
                'coco': 'captions_train2017.json', 'folder': 'caption file x.txt',
                'wds': 'KEY.jpg', 'tarpairs': 'ID_image'}[fmt]
    assert message.startswith('main.py: error: ') and expected in message and '\n' not in message, message
    if fmt in ('cc3m', 'csv', 'coco', 'tarpairs'):
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
    (['--dataset', 'webdataset'], 'valid: shapes, yfcc15m, cc3m, cc12m, merged, wds, tarpairs, csv, coco, folder'),
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

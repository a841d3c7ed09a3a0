"""Bad samples never crash a run and are never silent: >= 200 bad samples of every kind
mixed into each format are skipped, replaced and counted exactly; a mostly bad source stops
the run with one line naming the first failing file."""
import json
import os

import pytest

import datagen
import datasets
import main as train

RUN = ['--model', 'CLIP_TINYVIT_CLIP', '--image-size', '32', '--epochs', '1',
       '--zeroshot-datasets', 'shapes', '--print-freq', '100']
FORMATS = [f for f in datasets.DATASETS if f not in datagen.NOT_FUZZED]    # every registered format


def _last_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f][-1]


@pytest.mark.parametrize('fmt', FORMATS)
def test_fuzz_every_bad_kind_is_skipped_and_counted_exactly(tmp_path, fmt):
    skip = datagen.NOT_IN.get(fmt, set())
    kinds = len([k for k in datagen.BAD_IMAGES if k not in skip]) + \
        len([k for k in datagen.BAD_CAPTIONS if k not in skip])
    bad_each = -(-200 // kinds)                                      # >= 200 bad samples in all
    specs = datagen.specs(n_good=480 - bad_each * kinds - 48, bad_each=bad_each,
                          converted_each=6, long_each=6, skip=skip, seed=1)
    assert len(specs) == 480
    flags = datagen.WRITERS[fmt](str(tmp_path / 'data'), specs)
    out = str(tmp_path / 'out')
    results = train.main([*RUN, *flags, '--batch-size', '40', '--max-bad-fraction', '0.5',
                          '--output-dir', out])
    assert results is not None
    log = _last_log(out)
    expected = datagen.expected_counts(specs)
    got = {k[len('train_data_'):]: v for k, v in log.items() if k.startswith('train_data_')}
    got = {k.replace('skipped_', '', 1) if k.startswith('skipped_') else k: v for k, v in got.items()}
    for key, value in got.items():
        if key in ('skipped', 'retry_failed'):
            continue
        assert value == expected.get(key, 0), (key, value, expected.get(key, 0))
    assert got['skipped'] == sum(expected.get(r, 0) for r in set(datagen.BAD_IMAGES.values())
                                 | set(datagen.BAD_CAPTIONS.values())) >= 200
    assert log['step'] == 12


def test_mostly_bad_epoch_stops_after_max_bad_fraction(tmp_path):
    bad = {1: 'garbage', 3: 'zero', 5: 'missing', 6: 'trunc_jpeg', 8: 'bomb_jpeg', 10: 'garbage',
           12: 'missing', 13: 'trunc_png'}                       # none on a start-up probe position
    specs = [(bad.get(i, 'jpeg'), 'ok') for i in range(36)]
    flags = datagen.write_csv(str(tmp_path / 'data'), specs)
    with pytest.raises(SystemExit) as e:
        train.main([*RUN, *flags, '--batch-size', '4', '--output-dir', str(tmp_path / 'out')])
    message = str(e.value.code)
    assert message.startswith('main.py: error: 8 of 36 samples drawn this epoch were unusable (22.2% > '
                              '--max-bad-fraction 0.01; missing_file 2, empty_file 1, corrupt_image 4, '
                              'too_large 1); first: '), message
    assert os.path.join(str(tmp_path), 'data', 'img') in message and '\n' not in message
    assert not os.path.exists(tmp_path / 'out' / 'log.txt')          # no silent epoch logged as fine


def test_unreadable_source_stops_at_start(tmp_path):
    specs = [('garbage', 'ok')] * 10 + [('jpeg', 'ok')] * 6
    flags = datagen.write_cc(str(tmp_path / 'data'), specs, 'cc3m', 'jsonl')
    with pytest.raises(SystemExit) as e:
        train.main([*RUN, *flags, '--batch-size', '4', '--output-dir', str(tmp_path / 'out')])
    message = str(e.value.code)
    assert 'of 16 probed samples are unusable (first: corrupt_image: ' in message, message
    assert not os.path.exists(tmp_path / 'out' / 'checkpoint.pt')

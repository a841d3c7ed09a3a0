"""A data format is one `datasets.DatasetSpec`: its flags, its checks, its error messages and its
documentation come from the registry. A toy format registered here (reader + spec + fixture
writer, nothing else) trains through main([...])."""
import json
import os
import subprocess
import sys

import pytest

import datagen
import datasets
import main as train
import readers
import utils
from decode import read_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--model', 'CLIP_TINYVIT_CLIP', '--image-size', '32', '--batch-size', '4', '--epochs', '1',
        '--train-num-samples', '8', '--zeroshot-datasets', 'shapes', '--print-freq', '1']


# ----------------------------------------------------------------------------- a toy format

class PairsReader(readers.CaptionReader):
    """--metadata pairs.json: [{"image": path under --root, <--pairs-caption-key>: caption}]."""

    name = 'jsonpairs'
    layout = "--metadata a JSON list [{'image': path under --root, 'caption': text}] and --root DIR"

    def __init__(self, path, root, key, builder, opts, seed=0):
        super().__init__(builder, opts, seed)
        with open(path) as f:
            self.pairs, self.root, self.key = json.load(f), root, key

    def __len__(self):
        return len(self.pairs)

    def captions_of(self, i):
        return [self.pairs[i].get(self.key)], f'pair #{i}'

    def image_bytes(self, i):
        path = os.path.join(self.root, self.pairs[i]['image'])
        return read_bytes(path), path


def _build_pairs(args, tokenizer):
    builder = datasets._builder(args, tokenizer)
    return PairsReader(args.metadata, args.root, args.pairs_caption_key, builder,
                       datasets._opts(args, builder), args.seed)


def _pairs_flags(group):
    group.add_argument('--pairs-caption-key', default='caption', help='jsonpairs: caption field (caption)')


TOY = datasets.DatasetSpec('jsonpairs', _build_pairs, 'images + a JSON list of pairs', PairsReader.layout,
                           needs_root=True, needs_metadata=True, add_args=_pairs_flags, aliases=('pairs',))


def write_pairs(root, sample_specs, key='caption'):
    paths = datagen.write_files(root, sample_specs)
    meta = os.path.join(root, 'pairs.json')
    with open(meta, 'w') as f:
        json.dump([{'image': path, key: datagen.caption(cap, i)}
                   for i, ((_, cap), path) in enumerate(zip(sample_specs, paths))], f)
    return ['--dataset', 'jsonpairs', '--root', root, '--metadata', meta]


@pytest.fixture
def toy(monkeypatch):
    """The toy format registered for one test (the real registry restored afterwards)."""
    registry = utils.Registry('dataset')
    registry.update(datasets.DATASETS)
    monkeypatch.setattr(datasets, 'DATASETS', registry)
    datasets.register_dataset(TOY)
    return TOY


def test_a_registered_toy_format_trains_through_main(tmp_path, monkeypatch, toy):
    assert set(datagen.WRITERS) != set(datasets.DATASETS)      # the fixture-writer check catches it
    monkeypatch.setitem(datagen.WRITERS, 'jsonpairs', lambda r, s: write_pairs(r, s, key='text'))
    flags = datagen.WRITERS['jsonpairs'](str(tmp_path / 'data'), datagen.specs(n_good=12))
    out = str(tmp_path / 'out')
    results = train.main([*TINY, *flags, '--pairs-caption-key', 'text', '--output-dir', out])
    assert 0 <= results['shapes']['top1'] <= 100
    with open(os.path.join(out, 'log.txt')) as f:
        (log,) = [json.loads(line) for line in f]
    assert log['step'] == 2 and log['train_data_drawn'] == 8 and log['train_data_skipped'] == 0


def test_a_toy_format_gets_its_flags_checks_and_messages(tmp_path, capsys, toy):
    parser = train.get_args_parser()
    group = next(g for g in parser._action_groups if g.title == 'data (--dataset jsonpairs)')
    assert [a.option_strings for a in group._group_actions] == [['--pairs-caption-key']]
    registered = ', '.join(datasets.DATASETS)                     # the real formats, then the toy
    assert registered.startswith('shapes, yfcc15m, ') and registered.endswith(', folder, jsonpairs')
    assert (f'registered: {registered}; '
            'upstream alias merged_opendata = merged, pairs = jsonpairs') in ' '.join(parser.format_help().split())
    assert train.parse_args(['--dataset', 'pairs', '--root', '.', '--metadata', __file__]).dataset == 'jsonpairs'
    for argv, fragment in [(['--dataset', 'jsonpairs', '--metadata', __file__], '--dataset jsonpairs needs --root'),
                           (['--dataset', 'nope'], f'valid: {registered}')]:
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert fragment in capsys.readouterr().err
    message = _start_error(tmp_path, ['--dataset', 'jsonpairs', '--root', str(tmp_path / 'elsewhere'),
                                      '--metadata', write_pairs(str(tmp_path / 'd'), datagen.specs(8))[-1]])
    assert message.startswith('main.py: error: jsonpairs: 8 of 8 probed samples are unusable') \
        and message.endswith(f'expected {TOY.layout}'), message


def _start_error(tmp_path, flags):
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, *flags, '--output-dir', str(tmp_path / 'out')])
    return str(e.value.code)


def test_an_alias_cannot_shadow_a_format(toy):
    with pytest.raises(ValueError, match="alias 'csv' is taken"):
        datasets.register_dataset(datasets.DatasetSpec('csv2', _build_pairs, '', '', aliases=('csv',)))
    with pytest.raises(ValueError, match="alias 'pairs' is taken"):
        datasets.register_dataset(datasets.DatasetSpec('pairs2', _build_pairs, '', '', aliases=('pairs',)))


# ----------------------------------------------------------------------------- the real registry

@pytest.mark.parametrize('name', list(datasets.DATASETS))
def test_required_flags_come_from_the_spec(capsys, name):
    spec = datasets.DATASETS[name]
    missing = '--root' if spec.needs_root else '--metadata' if spec.needs_metadata else None
    if missing is None:
        assert train.parse_args(['--dataset', name]).dataset == name
        return
    given = ['--root', '.'] if missing == '--metadata' else ['--metadata', __file__] * spec.needs_metadata
    with pytest.raises(SystemExit) as e:
        train.parse_args(['--dataset', name, *given])
    assert e.value.code == 2 and f'--dataset {name} needs {missing}' in capsys.readouterr().err


def test_every_format_flag_is_a_main_flag_in_its_group():
    parser = train.get_args_parser()
    groups = {a.option_strings[-1]: g.title for g in parser._action_groups for a in g._group_actions}
    for name, spec in datasets.DATASETS.items():
        for flag, _ in spec.flags():
            assert name in groups[flag], (flag, groups[flag])


def test_docs_show_every_format_layout():
    """docs/data.md shows each format's layout word for word (python tools/data_formats.py
    prints the section to paste)."""
    path = os.path.join(ROOT, 'docs', 'data.md')
    assert os.path.isfile(path), 'docs/data.md is missing; `python tools/data_formats.py` prints its format section'
    doc = ' '.join(open(path, encoding='utf-8').read().split())
    missing = [name for name, spec in datasets.DATASETS.items() if ' '.join(spec.layout.split()) not in doc]
    assert not missing, f'docs/data.md lacks the layout of {missing}; see `python tools/data_formats.py`'


def test_the_docs_tool_prints_every_format():
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'data_formats.py')], capture_output=True,
                         text=True, check=True).stdout
    for name, spec in datasets.DATASETS.items():
        assert f'| `{name}`' in out and f'- `{name}`: `{spec.layout}`' in out
    assert '(alias `merged_opendata`)' in out and '`--csv-img-key`, `--csv-caption-key`, `--csv-separator`' in out

"""Sample order is a function of (seed, epoch, rank, world size); a run resumed mid-epoch
sees exactly the batches an uninterrupted run would have (map-style and streaming readers,
loader workers persisting across epochs)."""
import os

import pytest
import torch

import datagen
import datasets
import main as train

TINY = ['--model', 'CLIP_TINYVIT_CLIP', '--image-size', '32', '--batch-size', '4', '--epochs', '1',
        '--zeroshot-datasets', 'shapes', '--print-freq', '1']


def _loader(flags, tokenizer):
    parser = train.utils.OneLineErrorParser('main.py', parents=[train.get_args_parser()])
    args = parser.parse_args([*TINY, *flags])
    train.resolve_args(args)
    dataset = datasets.build_train_dataset(args, tokenizer)
    return datasets.build_loader(dataset, args)


def _epoch(sampler, loader, epoch, start=0):
    sampler.set_epoch(epoch, start=start)
    return [(b['image'], b['text'], b['_data']['counts']) for b in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def _mixed_specs():
    """40 samples, a few bad ones (their replacements must be reproduced too)."""
    specs = datagen.specs(n_good=40, seed=2)
    bad = {17: ('zero', 'ok'), 19: ('garbage', 'ok'), 22: ('trunc_jpeg', 'ok'), 26: ('missing', 'ok'),
           33: ('jpeg', 'empty')}
    return [bad.get(i, s) for i, s in enumerate(specs)]


@pytest.mark.parametrize('fmt', ['csv', 'wds', 'tfrecord'])
def test_resumed_epoch_replays_the_uninterrupted_order(tmp_path, tokenizer, fmt):
    flags = datagen.WRITERS[fmt](str(tmp_path / 'data'), _mixed_specs())
    flags += ['-j', '2', '--train-num-samples', '40']                # persistent workers
    sampler, loader = _loader(flags, tokenizer)
    first, second = _epoch(sampler, loader, 0), _epoch(sampler, loader, 1)
    assert len(first) == 10 and not _same(first, second)
    assert sum(int(c[0]) for *_, c in first) == 40                   # every sample drawn once
    sampler2, loader2 = _loader(flags, tokenizer)                    # a fresh process, resumed
    assert _same(_epoch(sampler2, loader2, 1, start=3 * 4), second[3:])
    assert _same(_epoch(sampler2, loader2, 0, start=8 * 4), first[8:])
    assert _same(_epoch(sampler2, loader2, 1), second)               # workers reused, not stale


def test_wds_resampled_order_is_seeded(tmp_path, tokenizer):
    flags = datagen.write_wds(str(tmp_path / 'data'), _mixed_specs(), shards=5)
    flags += ['--wds-resampled', '--train-num-samples', '24', '-j', '2']
    sampler, loader = _loader(flags, tokenizer)
    a = _epoch(sampler, loader, 0)
    sampler2, loader2 = _loader(flags, tokenizer)
    assert _same(_epoch(sampler2, loader2, 0, start=4), a[1:]) and len(a) == 6


def _weights(out):
    return torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)['model']


@pytest.mark.parametrize('fmt', ['csv', 'wds', 'tfrecord'])
def test_interrupted_training_resumes_bit_identically(tmp_path, fmt):
    flags = datagen.WRITERS[fmt](str(tmp_path / 'data'), _mixed_specs())
    argv = [*TINY, *flags, '--epochs', '2', '--train-num-samples', '24', '-j', '2',
            '--max-bad-fraction', '0.5']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    train.main([*argv, '--output-dir', straight])
    assert train.main([*argv, '--output-dir', split, '--exit-after-steps', '4']) is None   # mid-epoch 0
    train.main([*argv, '--output-dir', split])                                             # same command
    a, b = _weights(straight), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['csv', 'wds'])
def test_two_ranks_split_the_epoch_and_sum_the_skip_counts(tmp_path, fmt):
    """torchrun, 2 gloo processes: each rank draws its half of the epoch, and log.txt holds
    the skip counts of both ranks."""
    import subprocess
    import sys
    specs = _mixed_specs()
    flags = datagen.WRITERS[fmt](str(tmp_path / 'data'), specs)
    out = str(tmp_path / 'out')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
           '--master_port', str(29700 + os.getpid() % 200), os.path.join(root, 'main.py'),
           *TINY, *flags, '--train-num-samples', '40', '--max-bad-fraction', '0.5', '--output-dir', out]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline'}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    with open(os.path.join(out, 'log.txt')) as f:
        log = json.loads(f.readlines()[-1])
    expected = datagen.expected_counts(specs)
    assert log['step'] == 5 and log['train_data_drawn'] == 40 and log['train_data_skipped'] == 5
    for reason in ('empty_file', 'corrupt_image', 'missing_file', 'caption_empty'):
        assert log[f'train_data_skipped_{reason}'] == expected[reason], reason


def test_corrupt_shards_are_counted_and_skipped(tmp_path, tokenizer):
    specs = datagen.specs(n_good=30, seed=3)
    flags = datagen.write_wds(str(tmp_path / 'data'), specs, shards=3)
    with open(tmp_path / 'data' / '00001.tar', 'r+b') as f:          # cut inside a member
        f.truncate(os.path.getsize(tmp_path / 'data' / '00001.tar') // 2)
    with open(tmp_path / 'data' / '00002.tar', 'wb') as f:           # not a tar at all
        f.write(b'garbage' * 100)
    # 40 samples > the ~15 readable ones: the stream reads every shard, then wraps around
    sampler, loader = _loader(flags + ['--train-num-samples', '40', '--wds-shuffle-buffer', '0'], tokenizer)
    batches = _epoch(sampler, loader, 0)
    counts = dict(zip(datasets.readers.EVENTS, sum(c for *_, c in batches).tolist()))
    assert len(batches) == 10 and counts['drawn'] == 40 and counts['bad_shard'] >= 2

"""Data-loading soak: 8 loader workers stream 10 000 samples (10 % bad, every bad kind that
datagen offers, plus every converted mode and over-long captions) for 3 epochs through the
real reader and loader (datasets.build_train_dataset + build_loader, no model). Asserts no
worker crash, no hang (a deadline per epoch), bounded memory growth and exact skip counts.

    nice -n 10 python -m pytest -q -s tests/test_soak.py      # -s shows the figures

Format: `wds`, the cheapest to write and to read here: 16 tar files written sequentially
(`csv` needs 10 000 image files, i.e. 10 000 creates/opens per epoch), and the one a run
with 8 workers meets at scale (shards split across workers, batch-level replacement). With
16 shards of 625 samples, batches of 50 and 8 workers, each worker stream reads exactly its
2 shards once per epoch, so the per-epoch counts equal datagen.expected_counts exactly.

The loader runs in a child process (this file with --child) that prints one `SOAK {json}`
line per epoch; the test reads them against a deadline and kills the child's process group
on a hang. Memory is the summed VmRSS (and PSS, which does not count the pages the forked
workers share with their parent several times) of the child and all its descendants, from
/proc, after epoch 1 and after epoch 3 (persistent workers, so the same processes).
"""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from functools import lru_cache

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

N, BAD_EACH, CONVERTED_EACH, LONG_EACH = 10_000, 100, 20, 20     # 10 bad kinds x 100 = 10 %
SHARDS, WORKERS, BATCH, EPOCHS = 16, 8, 50, 3
EPOCH_TIMEOUT_S = 240          # a hang, not slowness: an epoch takes ~10-40 s on 2 busy cores
START_TIMEOUT_S = 180          # imports, tokenizer, probe, worker start-up
MAX_GROWTH_MB = 150            # summed RSS of the child + workers, epoch 1 -> epoch 3
DISTINCT_IMAGES = 50           # image bytes per kind are reused across samples (cheap to write)


# ----------------------------------------------------------------------------- the child

def _descendants(pid):
    """All descendant pids of `pid`, from /proc/<pid>/task/*/children (recursive)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f'/proc/{p}/task')
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f'/proc/{p}/task/{tid}/children') as f:
                    kids = [int(k) for k in f.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            out += kids
            todo += kids
    return out


def _memory_mb(pid):
    """(VmRSS, PSS) in MB of one process, from /proc."""
    rss = pss = 0
    try:
        with open(f'/proc/{pid}/status') as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))
        with open(f'/proc/{pid}/smaps_rollup') as f:
            pss = next((int(line.split()[1]) for line in f if line.startswith('Pss:')), 0)
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        pass
    return rss / 1024, pss / 1024


def _tree_memory():
    me = os.getpid()
    kids = _descendants(me)
    figures = [_memory_mb(p) for p in [me, *kids]]
    return {'pids': kids, 'rss_mb': sum(r for r, _ in figures), 'pss_mb': sum(p for _, p in figures),
            'main_rss_mb': figures[0][0]}


def child(config_path):
    """Iterate EPOCHS epochs over the loader; one `SOAK {json}` line per epoch."""
    sys.path.insert(0, ROOT)
    import datasets
    import main as train
    import readers
    with open(config_path) as f:
        config = json.load(f)
    args = train.parse_args(config['argv'])
    dataset = datasets.build_train_dataset(args, datasets.Tokenizer())
    sampler, loader = datasets.build_loader(dataset, args)
    print('SOAK ' + json.dumps({'ready': True}), flush=True)
    for epoch in range(config.get('epochs', EPOCHS)):
        sampler.set_epoch(epoch)
        log, n, t0 = readers.DataLog(args.max_bad_fraction), 0, time.time()
        for batch in loader:
            log.update(batch.pop('_data'))
            image, text = batch['image'], batch['text']
            assert image.shape[1:] == (3, args.image_size, args.image_size), image.shape
            assert text.shape[1:] == (77,) and image.shape[0] == text.shape[0] == args.batch_size
            n += image.shape[0]
        seconds = time.time() - t0
        counts = log.summary()
        print('SOAK ' + json.dumps({'epoch': epoch + 1, 'samples': n, 'seconds': seconds,
                                    'counts': counts, **_tree_memory()}), flush=True)


# ----------------------------------------------------------------------------- the test

def _write_data(folder, monkeypatch):
    """10 000 samples in 16 wds shards -> (specs, main.py flags). Images are 32 x 24 (datagen's
    64 x 48 halved) and each kind's bytes repeat every DISTINCT_IMAGES samples: writing takes
    ~2 s instead of ~20 s, and every sample still goes through the whole decode path."""
    import datagen
    pixels, image_bytes = datagen._pixels, datagen.image_bytes
    monkeypatch.setattr(datagen, '_pixels', lambda seed, w, h: pixels(seed, max(w // 2, 1), max(h // 2, 1)))
    cached = lru_cache(maxsize=None)(lambda kind, seed: image_bytes(kind, seed))
    monkeypatch.setattr(datagen, 'image_bytes', lambda kind, seed=0: cached(kind, seed % DISTINCT_IMAGES))
    kinds = len(datagen.BAD_IMAGES) + len(datagen.BAD_CAPTIONS)
    n_good = N - BAD_EACH * kinds - CONVERTED_EACH * len(datagen.CONVERTED) - LONG_EACH
    specs = datagen.specs(n_good=n_good, bad_each=BAD_EACH, converted_each=CONVERTED_EACH,
                          long_each=LONG_EACH, seed=7)
    assert len(specs) == N
    return specs, datagen.write_wds(str(folder), specs, shards=SHARDS)


def _reader(stream, lines):
    for line in stream:
        lines.put(line)
    lines.put(None)


def _run_child(config_path, log_path):
    """Start the child; yield its SOAK records, each within its deadline (kills on a hang)."""
    env = {**os.environ, 'WANDB_MODE': 'offline', 'PYTHONUNBUFFERED': '1'}
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--child', config_path],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
    lines = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    try:
        timeout, what = START_TIMEOUT_S, 'start-up'
        while True:
            deadline = time.time() + timeout
            while True:
                try:
                    line = lines.get(timeout=max(deadline - time.time(), 0.01))
                except queue.Empty:
                    pytest.fail(f"soak: {what} did not finish within {timeout} s (hang?); "
                                f"child log: {_tail(log_path)}")
                if line is None or line.startswith('SOAK '):
                    break
            if line is None:
                break
            record = json.loads(line[5:])
            yield record
            timeout, what = EPOCH_TIMEOUT_S, f"epoch {record.get('epoch', 0) + 1}"
        assert proc.wait(timeout=60) == 0, f"soak child failed (rc {proc.returncode}): {_tail(log_path)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)        # the child's own session: it and its workers
            proc.wait()


def _tail(path, n=30):
    with open(path) as f:
        return ''.join(f.readlines()[-n:])


@pytest.mark.slow
def test_loader_soak_8_workers_3_epochs(tmp_path, monkeypatch):
    import datagen
    t0 = time.time()
    specs, flags = _write_data(tmp_path / 'shards', monkeypatch)
    t_write = time.time() - t0
    config = tmp_path / 'soak.json'
    config.write_text(json.dumps({'argv': [
        *flags, '--train-num-samples', str(N), '--workers', str(WORKERS), '--batch-size', str(BATCH),
        '--model', 'CLIP_TINYVIT_CLIP', '--image-size', '32', '--max-bad-fraction', '0.5',
        '--output-dir', str(tmp_path / 'out')]}))
    records = list(_run_child(str(config), str(tmp_path / 'child.log')))
    epochs = [r for r in records if 'epoch' in r]
    assert [r['epoch'] for r in epochs] == list(range(1, EPOCHS + 1)), records

    expected = datagen.expected_counts(specs)
    bad = set(datagen.BAD_IMAGES.values()) | set(datagen.BAD_CAPTIONS.values())
    for r in epochs:
        got = {k[len('data_'):]: v for k, v in r['counts'].items()}
        got = {k.replace('skipped_', '', 1) if k.startswith('skipped_') else k: v for k, v in got.items()}
        for key, value in got.items():
            if key not in ('skipped', 'retry_failed'):
                assert value == expected.get(key, 0), (r['epoch'], key, value, expected.get(key, 0))
        assert got['skipped'] == sum(expected[k] for k in bad) == N // 10, (r['epoch'], got)
        assert r['samples'] == N

    first, last = epochs[0], epochs[-1]
    assert len(first['pids']) >= WORKERS and sorted(last['pids']) == sorted(first['pids']), \
        "loader worker processes died or were replaced between epoch 1 and epoch 3"
    growth = last['rss_mb'] - first['rss_mb']
    print(f"\nsoak: {N} samples x {EPOCHS} epochs, {WORKERS} workers, wds ({SHARDS} shards), "
          f"10% bad; data written in {t_write:.1f} s")
    for r in epochs:
        print(f"soak: epoch {r['epoch']}: {r['seconds']:.1f} s, {r['samples'] / r['seconds']:.0f} samples/s, "
              f"RSS {r['rss_mb']:.0f} MB (PSS {r['pss_mb']:.0f} MB, main {r['main_rss_mb']:.0f} MB), "
              f"{r['counts']['data_skipped']} skipped")
    print(f"soak: skip counts per epoch: " + ', '.join(
        f"{k[len('data_skipped_'):]} {v}" for k, v in last['counts'].items()
        if k.startswith('data_skipped_') and v) + '; notes: ' + ', '.join(
        f"{k[len('data_'):]} {v}" for k, v in last['counts'].items()
        if not k.startswith('data_skipped') and k != 'data_drawn' and v))
    print(f"soak: RSS growth epoch 1 -> {EPOCHS}: {growth:+.1f} MB (bound {MAX_GROWTH_MB} MB), "
          f"PSS {last['pss_mb'] - first['pss_mb']:+.1f} MB; total {time.time() - t0:.0f} s")
    assert growth < MAX_GROWTH_MB, f"loader memory grew by {growth:.0f} MB over {EPOCHS - 1} epochs"


if __name__ == '__main__':
    if sys.argv[1:2] == ['--child']:
        child(sys.argv[2])

"""Reliability: rotated checkpoints with digests, fallback from a corrupted newest one,
disk full during a write, non-finite step budget, graceful stop on SIGTERM / SIGUSR1 (also when
the signal reaches every process of the job, loader workers included, as scancel sends it)."""
import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data._utils import signal_handling

import checkpoint
import datagen
import main as train
import methods
import utils
from test_data_order import _loader
from test_main import TINY, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out, *extra):
    return train.main([*TINY, '--output-dir', str(out), *extra])


def _weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt['model'], ckpt['optimizer']['state'], ckpt['step']


def _assert_same(a, b):
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_rotation_keeps_n_files_each_with_its_digest(tmp_path):
    path = str(tmp_path / 'checkpoint.pt')
    for i in range(3):
        checkpoint.save({'i': torch.tensor(i)}, path, keep=2)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint.1.pt', 'checkpoint.pt']
    for name, i in [('checkpoint.pt', 2), ('checkpoint.1.pt', 1)]:
        raw = torch.load(tmp_path / name, weights_only=True)
        assert int(raw['i']) == i and raw['digest'] == checkpoint.content_digest({'i': torch.tensor(i)})
        assert int(checkpoint.load_checkpoint(str(tmp_path / name))['i']) == i


def test_kill_between_the_rotation_renames_keeps_a_verifiable_checkpoint(tmp_path):
    path = str(tmp_path / 'checkpoint.pt')
    for i in range(3):
        checkpoint.save({'i': torch.tensor(i)}, path, keep=2)
    os.replace(path, tmp_path / 'checkpoint.1.pt')     # the first rename of a 4th save, then killed
    ckpt, used = checkpoint.load_latest_good(path, keep=2)
    assert used.endswith('checkpoint.1.pt') and int(ckpt['i']) == 2


@pytest.mark.parametrize('damage', ['truncate', 'flip_byte', 'delete'])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, capsys):
    path = str(tmp_path / 'checkpoint.pt')
    for i in range(2):
        checkpoint.save({'i': torch.tensor(i), 'pad': torch.zeros(1000)}, path, keep=2)
    if damage == 'truncate':
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == 'flip_byte':
        with open(path, 'r+b') as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.remove(path)
    ckpt, used = checkpoint.load_latest_good(path, keep=2)
    assert used.endswith('checkpoint.1.pt') and int(ckpt['i']) == 0
    if damage != 'delete':
        assert 'corrupted or truncated' in capsys.readouterr().out


def test_training_resumes_from_previous_checkpoint_when_newest_is_corrupt(tmp_path):
    ref = tmp_path / 'ref'
    _run(ref, '--epochs', '2')
    out = tmp_path / 'out'
    _run(out, '--epochs', '2')
    os.truncate(out / 'checkpoint.pt', 100)                      # epoch 2's checkpoint is damaged
    _run(out, '--epochs', '2')                                   # resumes from epoch 1, redoes 2
    (a, a_opt, a_step), (b, b_opt, b_step) = _weights(ref / 'checkpoint.pt'), _weights(out / 'checkpoint.pt')
    assert a_step == b_step == 16
    _assert_same(a, b)
    for k in a_opt:
        _assert_same(a_opt[k], b_opt[k])


def test_disk_full_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, monkeypatch):
    out = tmp_path / 'out'
    _run(out, '--epochs', '1')
    before = checkpoint.file_digest(str(out / 'checkpoint.pt'))
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(checkpoint.torch, 'save', full_disk)
    with pytest.raises(SystemExit, match='No space left on device.*previous checkpoint is intact'):
        _run(out, '--epochs', '2', '--allow-resume-changes')      # train longer: a new schedule
    assert checkpoint.file_digest(str(out / 'checkpoint.pt')) == before
    assert not [n for n in os.listdir(out) if '.tmp.' in n]     # no partial file left behind
    monkeypatch.setattr(checkpoint.torch, 'save', real_save)
    assert _weights(out / 'checkpoint.pt')[2] == 8


@contextlib.contextmanager
def tmpfs(path, size):
    """A real small filesystem at `path` (root only); skipped where mount is impossible, a
    failure under CI=true. `size` is a mount size such as '64k'."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                              capture_output=True, text=True)
        why = done.stderr.strip() or f'exit {done.returncode}'
    except OSError as e:
        done, why = None, str(e)
    if done is None or done.returncode != 0:
        if os.environ.get('CI') == 'true':
            pytest.fail(f'cannot mount a tmpfs (CI must run this test): {why}')
        pytest.skip(f'cannot mount a tmpfs (needs root): {why}')
    try:
        yield path
    finally:
        subprocess.run(['umount', str(path)], check=True)


def _resize(path, size):
    subprocess.run(['mount', '-o', f'remount,size={size}', str(path)], check=True)


@pytest.mark.parametrize('write', ['save', 'save_atomic'])
def test_full_filesystem_leaves_no_partial_file_and_the_old_one_intact(tmp_path, write):
    """A real ENOSPC: torch.save raises RuntimeError (not OSError) on it."""
    with tmpfs(tmp_path / 'small', '256k') as small:
        path = str(small / 'checkpoint.pt')
        getattr(checkpoint, write)({'w': torch.ones(1000)}, path)
        before = checkpoint.file_digest(path)
        with pytest.raises(checkpoint.CheckpointWriteError, match='No space left on device.*intact'):
            getattr(checkpoint, write)({'w': torch.ones(100_000)}, path)       # 400 kB
        assert os.listdir(small) == ['checkpoint.pt']                         # no temp file
        assert checkpoint.file_digest(path) == before
        assert torch.equal(checkpoint.load_checkpoint(path)['w'], torch.ones(1000))


def _cli(out, *extra):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline'}
    return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *TINY, '--epochs', '2',
                           '--output-dir', str(out), *extra], env=env, capture_output=True, text=True,
                          timeout=1200)


@pytest.mark.slow
def test_real_full_disk_stops_with_one_line_and_the_same_command_resumes(tmp_path):
    """main.py on a tmpfs that holds the first epoch's checkpoints but not the second's."""
    with tmpfs(tmp_path / 'disk', '1g') as out:
        first = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *TINY, '--epochs', '1',
                                '--output-dir', str(out)], env={**os.environ, 'OMP_NUM_THREADS': '1'},
                               capture_output=True, text=True, timeout=1200)
        assert first.returncode == 0, first.stderr[-2000:]
        size = os.path.getsize(out / 'checkpoint.pt')
        used = sum(os.path.getsize(out / n) for n in os.listdir(out))
        _resize(out, used + size // 2)                  # epoch 2's checkpoint cannot fit
        longer = '--allow-resume-changes'               # epoch 1 ran with --epochs 1: train longer
        full = _cli(out, longer)
        assert full.returncode == 1, full.stderr[-2000:]
        assert 'Traceback' not in full.stderr, full.stderr[-3000:]
        errors = [line for line in full.stderr.splitlines() if 'error' in line.lower()]
        assert len(errors) == 1 and errors[0].startswith('main.py: error: could not write checkpoint'), errors
        assert 'No space left on device' in errors[0] and 'rerun the same command' in errors[0]
        assert not [n for n in os.listdir(out) if '.tmp.' in n]                # no partial file
        ckpt = checkpoint.load_checkpoint(str(out / 'checkpoint.pt'))          # verified
        assert ckpt['step'] == 8 and ckpt['epoch'] == 1
        _resize(out, '1g')                              # space freed
        again = _cli(out, longer)
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"resumed from {out / 'checkpoint.pt'}: epoch 1, step 8" in again.stdout
        assert checkpoint.load_checkpoint(str(out / 'checkpoint.pt'))['step'] == 16


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    out = tmp_path / 'out'
    build = methods.build_loss
    calls = {'n': 0}

    def poisoned(args):
        loss_fn = build(args)

        def forward(out_):
            terms = loss_fn(out_)
            calls['n'] += 1
            if calls['n'] > 2:                                   # steps 3, 4, 5 ... give NaN
                terms['loss'] = terms['loss'] * float('nan')
            return terms
        return forward
    monkeypatch.setattr(train.methods, 'build_loss', poisoned)
    with pytest.raises(SystemExit, match='3 steps in a row had a non-finite loss'):
        _run(out, '--epochs', '1', '--max-bad-steps', '3', '--save-freq-steps', '2', '--keep-checkpoints', '3')
    good = torch.load(out / 'checkpoint.2.pt', weights_only=True)   # saved at step 2 (.1: step 4)
    last = torch.load(out / 'checkpoint.pt', weights_only=True)     # saved at the stop
    assert good['step'] == 2 and last['step'] == 5 and last['state']['skipped_steps'] == 3
    _assert_same(good['model'], last['model'])                   # skipped steps changed nothing
    _assert_same(good['optimizer']['state'][0], last['optimizer']['state'][0])


def _start(out, *extra, session=False):
    """main.py in a subprocess; `session`: in a session (and process group) of its own."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline'}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'), *TINY, '--output-dir', str(out),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=session)


def _wait_for_step(out, step, proc, timeout=300):
    log = out / 'log_steps.txt'
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.exists() and any(json.loads(line)['step'] >= step for line in log.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise TimeoutError(f'step {step} not reached')


@pytest.mark.slow
@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGUSR1'])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, sig):
    flags = ['--epochs', '2']
    out = tmp_path / 'out'
    proc = _start(out, *flags)
    _wait_for_step(out, 3, proc)
    proc.send_signal(getattr(signal, sig))
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + getattr(signal, sig), text[-2000:]
    assert f'received {sig}: checkpoint saved at step' in text
    stopped = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert 3 <= stopped['step'] < 16
    logged = [s['step'] for s in read_jsonl(out / 'log_steps.txt')]
    assert logged[-1] == stopped['step']                        # no step lost, none half done
    if sig == 'SIGTERM':      # the rest of the run: same result (same thread count as the first part)
        _finish_equals_uninterrupted(out, tmp_path / 'ref', flags)


def _finish_equals_uninterrupted(out, ref, flags):
    """Rerun the stopped run in `out` and an uninterrupted one in `ref`: bit-identical weights
    and optimizer state. -> the rerun's output."""
    runs = [_start(out, *flags), _start(ref, *flags)]
    texts = [run.communicate(timeout=600)[0] for run in runs]
    for run, text in zip(runs, texts):
        assert run.returncode == 0, text[-2000:]
    (a, a_opt, a_step), (b, b_opt, b_step) = _weights(ref / 'checkpoint.pt'), _weights(out / 'checkpoint.pt')
    assert a_step == b_step
    _assert_same(a, b)
    for k in a_opt:
        _assert_same(a_opt[k], b_opt[k])
    return texts[0]


@pytest.mark.slow
def test_sigterm_to_every_process_with_loader_workers_checkpoints_and_resumes_exactly(tmp_path):
    """scancel and preemption signal every process of the job: the loader workers must leave the
    signal to the main process (a dead worker failed the step: exit 1, no checkpoint)."""
    flags = ['--epochs', '2', '--workers', '1']               # 8 steps per epoch, save-freq 0
    out = tmp_path / 'out'
    proc = _start(out, *flags, session=True)
    _wait_for_step(out, 5, proc)
    os.killpg(proc.pid, signal.SIGTERM)                      # `kill -TERM -- -PGID`
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, text[-2000:]
    assert 'Traceback' not in text and 'killed by signal' not in text, text[-2000:]
    stops = re.findall(r'received SIGTERM: checkpoint saved at step (\d+); rerun the same command', text)
    assert len(stops) == 1, text[-2000:]
    stopped = int(stops[0])
    assert 5 <= stopped < 16 and _weights(out / 'checkpoint.pt')[2] == stopped
    assert [s['step'] for s in read_jsonl(out / 'log_steps.txt')][-1] == stopped
    rerun = _finish_equals_uninterrupted(out, tmp_path / 'ref', flags)
    assert re.search(rf'resumed from \S+: epoch \d+, step {stopped},', rerun), rerun[-2000:]


# ----------------------------------------------------------------------------- loader workers

def _alive(pid):
    """The process exists and is not a zombie."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(') ', 1)[1][0] != 'Z'
    except FileNotFoundError:
        return False


@pytest.mark.parametrize('fmt', ['shapes', 'wds'])
def test_loader_workers_survive_stop_signals_from_outside(tmp_path, tokenizer, fmt):
    """datasets.build_loader, map-style and streaming: a SIGTERM / SIGUSR1 that another process
    (scancel) sends to the workers leaves them running; the epoch completes."""
    flags = (['--shapes-num-train', '40'] if fmt == 'shapes' else
             datagen.write_wds(str(tmp_path / 'data'), datagen.specs(n_good=40), shards=2))
    sampler, loader = _loader([*flags, '--train-num-samples', '40', '--workers', '2'], tokenizer)
    sampler.set_epoch(0)
    batches = iter(loader)
    got = [next(batches)]
    pids = [w.pid for w in batches._workers]
    for sig in ('TERM', 'USR1'):
        subprocess.run(['kill', f'-{sig}', *map(str, pids)], check=True)
    time.sleep(0.5)                    # a worker killed by it would be noticed by now (SIGCHLD)
    assert all(_alive(pid) for pid in pids)
    got += list(batches)
    assert len(got) == 10


class _Pids(torch.utils.data.Dataset):
    """Item i: (the worker's pid, the worker id its worker_init_fn saw); from item `slow` on, a
    minute's work, which first creates the file `busy`."""

    def __init__(self, slow, busy):
        self.slow, self.busy = slow, busy

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i >= self.slow:
            open(self.busy, 'w').close()
            time.sleep(60)
        return os.getpid(), os.environ.get('TEST_WORKER_INIT')


def _note_worker_init(worker_id):
    os.environ['TEST_WORKER_INIT'] = str(worker_id)


def test_a_stop_signal_at_worker_start_is_ignored_and_the_parent_still_ends_a_busy_worker(
        tmp_path, monkeypatch):
    real = signal_handling._set_worker_signal_handlers

    def then_signalled():                 # the first thing a worker does, before worker_init_fn
        real()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
    monkeypatch.setattr(signal_handling, '_set_worker_signal_handlers', then_signalled)
    monkeypatch.setattr(torch.utils.data._utils, 'MP_STATUS_CHECK_INTERVAL', 1.0)   # shutdown's wait
    busy = tmp_path / 'busy'
    loader = utils.StopSafeLoader(_Pids(slow=2, busy=busy), batch_size=None, num_workers=1,
                                  worker_init_fn=_note_worker_init)
    batches = iter(loader)
    (pid, init), again = next(batches), next(batches)
    assert pid != os.getpid() and list(again) == [pid, '0'] and init == '0' and _alive(pid)
    while not busy.exists():              # the worker is in item 2's minute
        time.sleep(0.05)
    t0 = time.time()
    batches._shutdown_workers()           # it does not stop within 1 s: the loader terminate()s it
    assert not _alive(pid) and 1 <= time.time() - t0 < 10

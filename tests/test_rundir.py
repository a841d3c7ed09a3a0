"""One output directory, one run (rundir.py): a second main.py in a live run's directory stops
with one line naming the first and changes nothing there; a killed run's lock does not block its
restart; --evaluate beside a live run deletes nothing; a file system without locks warns and goes
on; a resume under flags that change the run's meaning stops, or with --allow-resume-changes
warns and goes on; another number of processes with the same global batch resumes."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import main as train
import rundir
import utils
from test_main import TINY, read_jsonl
from test_reliability import _start, _wait_for_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import sys, time, rundir\n"
        "with rundir.claim(sys.argv[1]):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(600)\n")


def _holder(directory):
    """A process holding the run lock of `directory` (until killed)."""
    proc = subprocess.Popen([sys.executable, '-c', HOLD, str(directory)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, 'SLURM_JOB_ID': '4242'})
    assert proc.stdout.readline().strip() == 'locked'
    return proc


def _main_py(*argv):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline'}
    return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *argv], env=env,
                          capture_output=True, text=True, timeout=600)


def test_claim_refuses_a_held_directory_and_a_killed_holder_frees_it(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(SystemExit) as e:
            with rundir.claim(str(tmp_path)):
                pass
        message = str(e.value)
        assert message.startswith(f"main.py: error: {tmp_path} is in use by pid {holder.pid} on host "
                                  f"{socket.gethostname()} (Slurm job 4242, since 20")
        assert message.endswith("); wait for it, stop it, or use another --output-dir") and '\n' not in message
    finally:
        holder.kill()                                    # SIGKILL: no cleanup of its own
        holder.wait()
    with rundir.claim(str(tmp_path)) as lock:           # the kernel dropped the dead process's lock
        assert lock.exclusive
        assert json.loads((tmp_path / '.lock').read_text())['pid'] == os.getpid()
        with pytest.raises(SystemExit, match='in use by this process'):
            with rundir.claim(str(tmp_path)):           # a 2nd claim would share (then drop) the lock
                pass
    probe = _holder(tmp_path)                           # released at the end of the block
    probe.kill()
    probe.wait()


def test_file_system_without_locks_warns_once_and_keeps_temporaries(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(rundir.fcntl, 'lockf', no_locks)
    with rundir.claim(str(tmp_path)) as lock:
        assert not lock.exclusive                        # main.py then removes no *.tmp.* file
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith('warning: ') and 'cannot be prevented' in printed[0]


@pytest.mark.slow
def test_second_run_is_refused_and_evaluate_deletes_nothing_beside_a_live_run(tmp_path):
    out = tmp_path / 'out'
    first = _start(out, '--epochs', '30')
    try:
        _wait_for_step(out, 1, first)
        in_flight = out / f'log.txt.tmp.{first.pid}'    # as if the live run were inside a write
        in_flight.write_bytes(b'partial')
        args_json = (out / 'args.json').read_bytes()
        second = _main_py(*TINY, '--output-dir', str(out), '--epochs', '30')
        assert second.returncode != 0 and second.stdout == ''
        assert second.stderr.startswith(f"main.py: error: {out} is in use by pid {first.pid} on host "
                                        f"{socket.gethostname()} (") and second.stderr.count('\n') == 1
        evaluate = _main_py(*TINY, '--output-dir', str(out), '--epochs', '30', '--evaluate')
        assert evaluate.returncode == 0, evaluate.stderr[-2000:]
        assert in_flight.read_bytes() == b'partial'      # neither deleted the live run's file
        assert (out / 'args.json').read_bytes() == args_json
        assert len((out / 'command.txt').read_text().splitlines()) == 1
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        text = first.communicate(timeout=300)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, text[-2000:]
    steps = [s['step'] for s in read_jsonl(out / 'log_steps.txt')]
    assert steps == list(range(1, len(steps) + 1))      # one run's log, not two interleaved
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['step'] == steps[-1]


@pytest.mark.slow
def test_restart_after_sigkill_is_not_blocked(tmp_path, capsys):
    out = tmp_path / 'out'
    flags = ['--epochs', '30', '--save-freq-steps', '2']
    first = _start(out, *flags)
    try:
        _wait_for_step(out, 3, first)
        assert json.loads((out / '.lock').read_text())['pid'] == first.pid
    finally:
        first.kill()
        first.wait()
    assert train.main([*TINY, '--output-dir', str(out), *flags, '--exit-after-steps', '1']) is None
    assert 'resumed from' in capsys.readouterr().out


def test_evaluate_leaves_the_directory_alone(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    stale = out / 'checkpoint.pt.tmp.999999999'          # a (dead) writer's file: --evaluate keeps it
    stale.write_bytes(b'partial')
    train.main([*TINY, '--output-dir', str(out), '--evaluate'])
    assert sorted(os.listdir(out)) == ['checkpoint.pt.tmp.999999999']


def _fake_ckpt(world=1, **changes):
    args = train.parse_args([*TINY, '--epochs', '2'])
    return {'args': {**train.plain_args(args), 'steps_per_epoch': 8, **changes},
            'rng_ranks': [None] * world}


def _differences(ckpt, argv, world=1, monkeypatch=None):
    monkeypatch.setattr(utils, 'get_world_size', lambda: world)
    return rundir.resume_differences(ckpt, train.parse_args([*TINY, '--epochs', '2', *argv]),
                                     train.get_args_parser())


def test_resume_differences_compare_the_meaning_and_the_global_batch(monkeypatch):
    ckpt = _fake_ckpt()
    operational = ['--print-freq', '3', '--save-freq-steps', '5', '--exit-after-steps', '2', '-j', '2',
                   '--keep-checkpoints', '4', '--max-bad-steps', '0', '--eval-freq', '2', '--resume', '',
                   '--wds-shuffle-buffer', '10']
    assert _differences(ckpt, operational, monkeypatch=monkeypatch) == []
    assert _differences(ckpt, ['--batch-size', '32'], world=2, monkeypatch=monkeypatch) == []   # same 64
    assert _differences(ckpt, ['--batch-size', '32', '--update-freq', '2'], monkeypatch=monkeypatch) == []
    assert _differences(ckpt, ['--lr', '1e-3', '--seed', '1', '--dataset', 'shapes', '--epochs', '3'],
                        monkeypatch=monkeypatch) == ['--epochs: 2 → 3', '--lr: 0.003 → 0.001', '--seed: 0 → 1']
    assert _differences(ckpt, [], world=2, monkeypatch=monkeypatch) == [
        'global batch (--batch-size x --update-freq x processes): 64 x 1 x 1 = 64 → 64 x 1 x 2 = 128']
    assert _differences(_fake_ckpt(world=2), ['--batch-size', '128'], monkeypatch=monkeypatch) == []
    legacy = _fake_ckpt()
    del legacy['args']['seed']                                 # a flag the checkpoint did not record
    assert _differences(legacy, ['--seed', '1'], monkeypatch=monkeypatch) == []


def test_resume_with_changed_settings_is_refused_unless_allowed(tmp_path, capsys):
    out = str(tmp_path / 'out')
    flags = [*TINY, '--output-dir', out, '--epochs', '2']
    assert train.main([*flags, '--exit-after-steps', '2']) is None
    with pytest.raises(SystemExit) as e:
        train.main([*flags, '--lr', '1e-3', '--batch-size', '32'])
    message = str(e.value)
    assert message.startswith(f"main.py: error: {out}/checkpoint.pt was trained with other settings: ")
    assert "--lr: 0.003 → 0.001" in message and "64 x 1 x 1 = 64 → 32 x 1 x 1 = 32" in message
    assert '--allow-resume-changes' in message and '\n' not in message
    assert torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)['step'] == 2   # untouched
    train.main([*flags, '--lr', '1e-3', '--evaluate'])           # evaluating reads the weights only
    capsys.readouterr()
    assert train.main([*flags, '--lr', '1e-3', '--allow-resume-changes', '--exit-after-steps', '1']) is None
    printed = capsys.readouterr().out
    assert 'warning: resuming' in printed and "--lr: 0.003 → 0.001" in printed
    ckpt = torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)
    assert ckpt['step'] == 3 and ckpt['args']['lr'] == 1e-3      # the new value is the run's now


def test_finetune_into_a_new_directory_is_not_a_resume(tmp_path):
    first = str(tmp_path / 'first')
    train.main([*TINY, '--output-dir', first, '--epochs', '1', '--exit-after-steps', '1'])
    assert train.main([*TINY, '--output-dir', str(tmp_path / 'second'), '--epochs', '1', '--lr', '1e-3',
                       '--finetune', os.path.join(first, 'checkpoint.pt'), '--exit-after-steps', '1']) is None


@pytest.mark.slow
def test_resume_under_two_processes_needs_the_same_global_batch(tmp_path):
    out = str(tmp_path / 'out')
    train.main([*TINY, '--output-dir', out, '--epochs', '1', '--exit-after-steps', '2'])   # 1 x 64
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline'}

    def torchrun(batch):
        return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                               '--master_port', str(29300 + os.getpid() % 100), os.path.join(ROOT, 'main.py'),
                               *TINY, '--output-dir', out, '--epochs', '1', '--batch-size', batch],
                              env=env, capture_output=True, text=True, timeout=600)
    refused = torchrun('64')                                     # 2 x 64 = 128
    assert refused.returncode != 0
    assert '64 x 1 x 1 = 64 → 64 x 1 x 2 = 128' in refused.stderr, refused.stderr[-3000:]
    resumed = torchrun('32')                                     # 2 x 32 = 64
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed from' in resumed.stdout and 'step 2' in resumed.stdout
    assert torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)['step'] == 8

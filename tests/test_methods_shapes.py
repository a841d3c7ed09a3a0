"""bench/methods_shapes.py --runs-dir: a run stopped by SIGTERM checkpoints, the same command
resumes it and adds up both invocations' CPU, and a finished run is reprinted without training."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'bench', 'methods_shapes.py')


def _cmd(runs_dir):
    return [sys.executable, SCRIPT, '--methods', 'CLIP', '--epochs', '12', '--train-num-samples', '128',
            '--runs-dir', str(runs_dir)]


def _env():
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline'}


def _usage(run_dir):
    with open(run_dir / 'bench_usage.txt') as f:
        return [json.loads(line) for line in f]


def _wait_for_epoch(run_dir, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / 'log.txt').exists() and (run_dir / 'log.txt').read_text().strip():
            return
        time.sleep(0.2)
    raise AssertionError(f'no epoch logged in {run_dir} (exit {proc.poll()})')


@pytest.mark.slow
def test_stopped_run_resumes_and_a_finished_one_is_reprinted(tmp_path):
    run_dir = tmp_path / 'CLIP_1x_seed0'
    proc = subprocess.Popen(_cmd(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_epoch(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith('methods_shapes.py: error: CLIP seed 0: main.py exited with 143'), err[-2000:]
    assert 'rerun the same command to resume' in last
    stopped_at = [json.loads(line) for line in (run_dir / 'log.txt').read_text().splitlines()][-1]['epoch']
    assert stopped_at < 12 and (run_dir / 'checkpoint.pt').exists()
    assert [u['exit'] for u in _usage(run_dir)] == [143]

    done = subprocess.run(_cmd(tmp_path), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = done.stdout.strip().splitlines()[-1]
    assert row.startswith('| CLIP | `CLIP_TINYCNN_CLIP` |') and '(2 invocations, incl. set-up)' in row, row
    usage = _usage(run_dir)
    assert [u['exit'] for u in usage] == [143, 0]
    cpu_min = float(row.split(' | ')[-2])
    assert cpu_min == pytest.approx(sum(u['cpu_s'] for u in usage) / 60, abs=0.051)
    epochs = [json.loads(line)['epoch'] for line in (run_dir / 'log.txt').read_text().splitlines()]
    assert epochs == list(range(1, 13))                   # resumed, not started again

    again = subprocess.run(_cmd(tmp_path), env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == row
    assert len(_usage(run_dir)) == 2                      # not trained again

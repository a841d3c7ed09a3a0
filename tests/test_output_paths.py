"""Unusable paths stop with one line before any work, never a traceback: a directory given for a
file and a file for a directory, read-only output locations (a read-only bind mount: root ignores
permission bits, not EROFS), a checkpoint in a read-only directory (eval_zeroshot.py caches text
features under $XDG_CACHE_HOME instead), and an evaluation where nothing was evaluated."""
import contextlib
import io
import os
import shutil
import subprocess

import pytest

import eval_zeroshot
import interop
import main as train
import models
import zeroshot
from test_main import TINY
from zs_helpers import tiny_checkpoint


@pytest.fixture
def read_only(tmp_path):
    """(src, ro): `ro` shows the files of `src`, read-only (EROFS, even for root)."""
    src, ro = tmp_path / 'src', tmp_path / 'ro'
    src.mkdir()
    ro.mkdir()
    if os.geteuid() != 0:                              # permission bits do the job for other users
        os.chmod(ro, 0o555)
        yield ro, ro
        os.chmod(ro, 0o755)
        return
    mount = subprocess.run(['mount', '--bind', str(src), str(ro)], capture_output=True, text=True)
    if mount.returncode == 0:
        mount = subprocess.run(['mount', '-o', 'remount,bind,ro', str(ro)], capture_output=True, text=True)
        if mount.returncode != 0:
            subprocess.run(['umount', str(ro)])
    if mount.returncode != 0:
        if os.environ.get('CI') == 'true':
            pytest.fail(f"cannot make a read-only mount: {mount.stderr.strip()}")
        pytest.skip(f"cannot make a read-only mount: {mount.stderr.strip()}")
    try:
        yield src, ro
    finally:
        subprocess.run(['umount', str(ro)], check=True)


def _one_line_exit(fn, argv, prog):
    """fn(argv) exits non-zero with one line `PROG...: error: ...` -> that line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        fn(argv)
    line = e.value.code if isinstance(e.value.code, str) else err.getvalue().rstrip('\n')
    assert e.value.code != 0 and line.startswith(prog) and ': error: ' in line and '\n' not in line, line
    return line


def _never(*args, **kwargs):
    raise AssertionError('the work started before the output was checked')


@pytest.fixture
def ours(tmp_path):
    path = tmp_path / 'ours.pt'
    interop.save_ours(str(path), models.create_model('CLIP_TINYVIT_CLIP'), 'CLIP_TINYVIT_CLIP', {}, {'from': 'test'})
    return str(path)


def test_interop_export_of_a_directory_or_a_missing_file(tmp_path, ours):
    shutil.copy(ours, tmp_path / 'checkpoint.pt')
    line = _one_line_exit(interop.main, ['export', '--checkpoint', str(tmp_path), '--out', str(tmp_path / 'x')],
                          'interop.py export')
    assert 'is a directory' in line and str(tmp_path / 'checkpoint.pt') in line
    line = _one_line_exit(interop.main, ['export', '--checkpoint', str(tmp_path / 'nope.pt'), '--out',
                                         str(tmp_path / 'x')], 'interop.py export')
    assert 'nope.pt' in line


@pytest.mark.parametrize('to', ['openclip', 'slip'])
def test_interop_export_into_a_read_only_directory(read_only, ours, to, monkeypatch):
    _, ro = read_only
    monkeypatch.setattr(interop, 'load_ours', _never)
    line = _one_line_exit(interop.main, ['export', '--checkpoint', ours, '--to', to, '--out', str(ro / 'out' / 'x')],
                          'interop.py export')
    assert 'Read-only file system' in line or 'Permission denied' in line


def test_interop_import_into_a_read_only_directory(read_only, ours, monkeypatch):
    _, ro = read_only
    monkeypatch.setattr(interop, 'import_checkpoint', _never)
    line = _one_line_exit(interop.main, ['import', '--from', 'slip', '--checkpoint', ours, '--out', str(ro / 'x.pt')],
                          'interop.py import')
    assert '--out' in line and str(ro) in line


def test_main_output_dir_read_only_or_a_file(read_only, tmp_path):
    _, ro = read_only
    line = _one_line_exit(train.main, [*TINY, '--output-dir', str(ro / 'run')], 'main.py')
    assert '--output-dir' in line and 'cannot write in' in line
    (tmp_path / 'afile').write_text('x')
    line = _one_line_exit(train.main, [*TINY, '--output-dir', str(tmp_path / 'afile')], 'main.py')
    assert 'is a file, not a directory' in line
    line = _one_line_exit(train.main, [*TINY, '--output-dir', str(tmp_path / 'afile' / 'run')], 'main.py')
    assert 'is a file, not a directory' in line


def test_eval_zeroshot_checkpoint_in_a_read_only_directory(read_only, tmp_path, monkeypatch, capsys):
    src, ro = read_only
    tiny_checkpoint(tmp_path / 'tiny.pt')
    shutil.copy(tmp_path / 'tiny.pt', src / 'tiny.pt')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    base = ['--resume', str(ro / 'tiny.pt'), '--datasets', 'shapes', '--batch-size', '50']
    monkeypatch.setattr(zeroshot, 'run', _never)
    line = _one_line_exit(eval_zeroshot.main, base, 'eval_zeroshot.py')   # results beside it: not possible
    assert '--output-dir' in line and 'pass --output-dir DIR' in line
    monkeypatch.undo()
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    results = eval_zeroshot.main([*base, '--output-dir', str(tmp_path / 'zs')])
    assert 0 <= results['shapes']['top1'] <= 100 and os.listdir(ro) == ['tiny.pt']
    assert os.listdir(tmp_path / 'xdg' / 'vlp-baselines' / 'text_cache')        # the cache went there
    eval_zeroshot.main([*base, '--output-dir', str(tmp_path / 'zs')])
    assert 'text features: 1 from cache, 0 computed' in capsys.readouterr().out
    monkeypatch.setenv('XDG_CACHE_HOME', str(ro / 'xdg'))                       # not writable either
    eval_zeroshot.main([*base, '--output-dir', str(tmp_path / 'zs')])
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith('warning:')]
    assert len(warnings) == 1 and 'text features are not cached' in warnings[0]
    assert 'text features: 0 from cache, 1 computed' in printed


def test_eval_zeroshot_output_checked_before_the_evaluation(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / 'tiny.pt')
    monkeypatch.setattr(zeroshot, 'run', _never)
    line = _one_line_exit(eval_zeroshot.main, ['--resume', ckpt, '--datasets', 'shapes', '--output', str(tmp_path)],
                          'eval_zeroshot.py')
    assert '--output' in line and 'is a directory' in line
    line = _one_line_exit(eval_zeroshot.main, ['--resume', ckpt, '--datasets', 'shapes', '--output-dir', ckpt],
                          'eval_zeroshot.py')
    assert 'is a file, not a directory' in line


def test_eval_zeroshot_with_nothing_evaluated_fails(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / 'tiny.pt')
    line = _one_line_exit(eval_zeroshot.main, ['--resume', ckpt, '--datasets', 'cifar10', 'mnist', '--data-root',
                                               str(tmp_path / 'empty'), '--no-cache'], 'eval_zeroshot.py')
    assert 'nothing was evaluated' in line and '2 dataset(s)' in line
    assert 'cifar10: skipped: not found' in capsys.readouterr().out
    assert not os.path.exists(tmp_path / 'zeroshot' / 'results.csv')

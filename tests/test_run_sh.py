"""run.sh: one commit -> one experiment. Dirty-tree refusal, comma sweeps (Cartesian product,
derived names), --dry-run, the git-archive snapshot, and a real local torchrun of main.py that
resumes when the same command is launched again. Runs in a clone of this repository (so the
checkout's own uncommitted state does not matter) with EXP_ROOT under tmp_path; no Slurm."""
import filecmp
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run.sh and what it runs from the snapshot, taken from the working tree so that they are
# tested before they are committed (in a clean checkout these equal HEAD's)
OVERLAY = ['run.sh', 'run_with_submitit.py', 'tools/check_jobs.py', 'tools/slurm_local.sh']
TINY = ['--shapes-num-train', '512', '--batch-size', '64', '--epochs', '1', '--print-freq', '1',
        '--zeroshot-datasets', 'shapes']


def git(repo, *args):
    return subprocess.run(['git', '-C', str(repo), '-c', 'user.name=test', '-c',
                           'user.email=test@example.invalid', *args],
                          check=True, capture_output=True, text=True).stdout


def make_clone(dst):
    """A clone of this repository's HEAD plus the working-tree OVERLAY files and every tracked
    file changed in the working tree (what the Slurm tests run), committed."""
    if not os.path.exists(os.path.join(ROOT, '.git')) or shutil.which('git') is None:   # dir or worktree file
        pytest.skip('needs git and a git checkout of the repository')
    subprocess.run(['git', 'clone', '-q', ROOT, str(dst)], check=True)
    changed = git(ROOT, 'diff', '--name-only', '--diff-filter=M', 'HEAD').splitlines()
    for name in dict.fromkeys([*OVERLAY, *changed]):
        shutil.copy2(os.path.join(ROOT, name), os.path.join(dst, name))
    git(dst, 'add', '-A')
    git(dst, 'commit', '-q', '--allow-empty', '-m', 'test overlay')
    return str(dst)


def run_sh(repo, cwd, exp_root, *args, check=True, timeout=300):
    env = {**os.environ, 'PYTHON': sys.executable, 'EXP_ROOT': str(exp_root),
           'WANDB_MODE': 'offline'}
    env.pop('VIRTUAL_ENV', None)
    proc = subprocess.run([os.path.join(repo, 'run.sh'), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope='module')
def repo(tmp_path_factory):
    return make_clone(tmp_path_factory.mktemp('clone') / 'repo')


@pytest.fixture
def where(tmp_path):
    """(cwd, EXP_ROOT) for one test: an empty working directory and experiment root."""
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    return str(cwd), str(tmp_path / 'exp')


def sha(repo):
    return git(repo, 'rev-parse', '--short', 'HEAD').strip()


def test_dirty_tree_is_refused_unless_allowed(repo, where):
    cwd, exp = where
    readme = os.path.join(repo, 'README.md')
    original = open(readme, 'rb').read()
    try:
        with open(readme, 'ab') as f:
            f.write(b'\nan uncommitted edit\n')
        proc = run_sh(repo, cwd, exp, '--local', 'x', 'main.py', *TINY, check=False)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and 'uncommitted changes' in err[0], proc.stderr
        assert '--allow-dirty' in err[0]
        assert not os.path.exists(exp)
        proc = run_sh(repo, cwd, exp, '--dry-run', '--allow-dirty', '--local', 'x', 'main.py', *TINY)
        assert 'not part of the snapshot' in proc.stderr
        assert len(proc.stdout.strip().splitlines()) == 1
    finally:
        with open(readme, 'wb') as f:
            f.write(original)


def jobs_of(stdout):
    """--dry-run lines 'cd DIR && CMD...' -> list of argv lists (CMD only)."""
    lines = stdout.strip().splitlines()
    argvs = []
    for line in lines:
        words = shlex.split(line)
        assert words[0] == 'cd' and words[2] == '&&', line
        argvs.append(words[3:])
    return argvs


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_comma_lists_expand_to_the_cartesian_product(repo, where):
    cwd, exp = where
    proc = run_sh(repo, cwd, exp, '--dry-run', 'sweep', 'run_with_submitit.py', '--ngpus', '0',
                  '--seed', '0,10,50', '--lr', '1e-3,2e-3', '--csv-separator', r'\,', '--epochs', '2')
    argvs = jobs_of(proc.stdout)
    base = os.path.join(exp, 'sweep', sha(repo))
    names = [f'sweep_seed{s}_lr{lr}' for s in ('0', '10', '50') for lr in ('1e-3', '2e-3')]
    assert [os.path.basename(flag(a, '--output-dir')) for a in argvs] == names
    assert all(os.path.dirname(flag(a, '--output-dir')) == base for a in argvs)
    assert [(flag(a, '--seed'), flag(a, '--lr')) for a in argvs] == \
        [(s, lr) for s in ('0', '10', '50') for lr in ('1e-3', '2e-3')]
    for a in argvs:
        assert a[1] == os.path.join(base, 'code', 'run_with_submitit.py')
        assert flag(a, '--csv-separator') == ',' and flag(a, '--epochs') == '2'   # \, is a literal comma
    assert not os.path.exists(exp)                                              # dry run: nothing written


def test_single_job_and_equals_form(repo, where):
    cwd, exp = where
    proc = run_sh(repo, cwd, exp, '--dry-run', '--local', '--nproc', '2', 'one', 'main.py', '--seed', '3')
    (argv,) = jobs_of(proc.stdout)
    assert argv[1:6] == ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
    assert flag(argv, '--output-dir') == os.path.join(exp, 'one', sha(repo), 'one')
    proc = run_sh(repo, cwd, exp, '--dry-run', '--local', 'eq', 'main.py', '--seed=1,2')
    argvs = jobs_of(proc.stdout)
    assert [a[-3:] for a in argvs] == [['--seed=1', '--output-dir', os.path.join(exp, 'eq', sha(repo), 'eq_seed1')],
                                       ['--seed=2', '--output-dir', os.path.join(exp, 'eq', sha(repo), 'eq_seed2')]]
    proc = run_sh(repo, cwd, exp, '--dry-run', '--local', 'eq', 'main.py', '--output-dir=out/a,out/b')
    assert [a[-1] for a in jobs_of(proc.stdout)] == ['--output-dir=out/a', '--output-dir=out/b']  # kept


@pytest.mark.parametrize('args, fragment', [
    (['--dry-run', 'bad', 'run_with_submitit.py', '--seed', '1,2', '--model', 'CLIP_NOPE_CLIP'],
     'job bad_seed1: run_with_submitit.py: error: unknown backbone'),
    (['--dry-run', '--local', 'bad', 'main.py', '--batch-size', '8,0'], 'job bad_batch-size0: main.py: error'),
    (['--dry-run', '--local', 'bad', 'main.py', '--csv-separator', ','], 'empty value in the comma list'),
    (['--dry-run', 'bad', 'main.py'], 'main.py runs only with --local'),
    (['--dry-run', '--local', 'bad', 'run_with_submitit.py'], 'submits to Slurm'),
    (['--dry-run', 'bad', 'train.py'], 'SCRIPT must be'),
    (['--dry-run', '--local', 'bad/x', 'main.py'], 'NAME must be'),
    (['--dry-run', '--local', 'bad', 'main.py', '--seed', '1,2', '--output-dir', 'same'], 'would share --output-dir'),
])
def test_bad_launches_fail_with_one_line_and_write_nothing(repo, where, args, fragment):
    cwd, exp = where
    proc = run_sh(repo, cwd, exp, *args, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and fragment in err[0], proc.stderr
    assert not proc.stdout and not os.path.exists(exp)


def archive_of_head(repo, dst):
    data = subprocess.run(['git', '-C', repo, 'archive', '--format=tar', 'HEAD'], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dst, filter='data')


def same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    if filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)[1:] != ([], []):
        return False
    return all(same_tree(os.path.join(a, d), os.path.join(b, d)) for d in cmp.common_dirs)


@pytest.mark.slow          # three launches of python/torchrun: ~40 s on a quiet 2-core machine
def test_local_run_from_snapshot_and_resume_by_relaunch(repo, where, tmp_path):
    """A real `torchrun main.py` from the snapshot, stopped after 5 of 8 steps; the same
    run.sh command again resumes in the same directory and finishes the epoch."""
    cwd, exp = where
    args = ['--local', 'tiny', 'main.py', *TINY, '--exit-after-steps', '5']
    dry = run_sh(repo, cwd, exp, '--dry-run', *args).stdout.strip()
    first = run_sh(repo, cwd, exp, *args)
    out = os.path.join(exp, 'tiny', sha(repo), 'tiny')
    assert torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)['step'] == 5
    assert 'stopping after 5 steps' in first.stdout
    run_sh(repo, cwd, exp, *args)
    ckpt = torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)
    assert ckpt['step'] == 8 and ckpt['epoch'] == 1
    assert [json.loads(line)['epoch'] for line in open(os.path.join(out, 'log.txt'))] == [1]
    commands = open(os.path.join(out, 'command.txt')).read().splitlines()
    assert commands.count(dry) == 2, commands                    # run.sh's exact command, per launch
    archive_of_head(repo, tmp_path / 'head')
    assert same_tree(os.path.join(exp, 'tiny', sha(repo), 'code'), tmp_path / 'head')

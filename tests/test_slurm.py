"""run_with_submitit.py's checks, Slurm parameters and Trainer (no Slurm needed), then system
tests on a real single-node Slurm (tools/slurm_local.sh, as root): run.sh +
run_with_submitit.py train a small shapes CLIP with 2 gloo tasks; a job interrupted twice (the
USR2 that Slurm sends before a time limit -> Trainer.checkpoint(); then `scontrol requeue`, a
preemption) ends with the same step count and bit-identical weights as an uninterrupted one;
so does a job stopped by SIGUSR1 (checkpoint at that step, then it requeues itself), and a job
with loader workers stopped by scancel (checkpoint at that step) and submitted again;
a `--seed 0,1,2` sweep gives 3 finished experiments. Slurm missing or not root: skipped, but
failed under CI=true (CI must run these)."""
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import missing_setup
from test_run_sh import git, make_clone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_LOCAL = os.path.join(ROOT, 'tools', 'slurm_local.sh')
# 2 tasks x batch 32 over 512 samples: 8 steps per epoch; a step checkpoint every 2 steps
FLAGS = ['--ngpus', '0', '--cpus-per-task', '1', '--shapes-num-train', '512', '--batch-size', '32',
         '--print-freq', '1', '--save-freq-steps', '2', '--zeroshot-datasets', 'shapes', '--timeout', '30']
TWO_TASKS = [*FLAGS, '--tasks-per-node', '2', '--epochs', '2', '--eval-freq', '2']
DONE = {'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'OUT_OF_MEMORY', 'BOOT_FAIL',
        'DEADLINE', 'PREEMPTED'}

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------- run_with_submitit.py, no Slurm

def test_flags_are_checked_before_submission(tmp_path, capsys):
    import run_with_submitit
    with pytest.raises(SystemExit) as e:
        run_with_submitit.main(['--model', 'CLIP_NOPE_CLIP', '--output-dir', str(tmp_path / 'x')])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and 'unknown backbone' in err[0], err
    assert not os.path.exists(tmp_path / 'x')


def test_executor_parameters(tmp_path):
    import run_with_submitit as rws
    args = rws.get_args_parser().parse_args(['--ngpus', '0', '--output-dir', str(tmp_path / 'out')])
    rws.check_args(args)
    params = rws.executor_parameters(args)
    assert 'gpus_per_node' not in params and 'mem_gb' not in params and params['tasks_per_node'] == 1
    assert args.output_dir == str(tmp_path / 'out') and args.job_dir == str(tmp_path / 'out' / 'submitit')
    args = rws.get_args_parser().parse_args(['--nodes', '4', '--use-volta32', '--mem-per-gpu', '40',
                                              '--partition', 'p', '--output-dir', 'rel'])
    rws.check_args(args)
    params = rws.executor_parameters(args)
    assert (params['nodes'], params['gpus_per_node'], params['tasks_per_node'], params['mem_gb']) == (4, 8, 8, 320)
    assert params['slurm_constraint'] == 'volta32gb' and params['slurm_partition'] == 'p'
    assert os.path.isabs(args.output_dir) and params['name'] == 'rel'


def test_trainer_pickles_requeues_itself_and_prefers_the_latest_checkpoint(tmp_path, monkeypatch):
    import pickle

    import main
    import run_with_submitit as rws
    old = tmp_path / 'pretrained.pt'
    old.write_bytes(b'')
    argv = ['--output-dir', str(tmp_path / 'out'), '--resume', str(old)]
    args = rws.get_args_parser().parse_args(argv)
    trainer = pickle.loads(pickle.dumps(rws.Trainer(args, argv)))
    again = trainer.checkpoint()                                  # a submitit DelayedSubmission
    assert type(again.function) is rws.Trainer and vars(again.function.args) == vars(args)
    seen = []
    monkeypatch.setattr(main, 'main', lambda args: seen.append(args.resume))
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    trainer()                                                     # first start: --resume
    os.makedirs(tmp_path / 'out')
    (tmp_path / 'out' / 'checkpoint.pt').write_bytes(b'')
    trainer()                                                     # requeued: OUTPUT_DIR/checkpoint.pt
    assert seen == [str(old), '']
    assert trainer.args.resume == str(old)                        # the pickled flags are unchanged


# ----------------------------------------------------------------- a real Slurm

def _unavailable():
    if os.geteuid() != 0:
        return 'needs root (tools/slurm_local.sh starts munged, slurmctld and slurmd)'
    missing = [b for b in ('munged', 'slurmctld', 'slurmd', 'sbatch', 'scontrol')
               if shutil.which(b) is None and not os.path.exists(f'/usr/sbin/{b}')]
    if missing:
        return f'Slurm not installed ({", ".join(missing)} missing): as root run `bash tools/setup_system.sh`'
    return None


@pytest.fixture(scope='session')
def slurm():
    reason = _unavailable()
    if reason:
        missing_setup(reason)
    already = subprocess.run([SLURM_LOCAL, 'status'], capture_output=True, text=True).returncode == 0
    if not already:
        proc = subprocess.run([SLURM_LOCAL, 'start'], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    yield
    if not already:
        subprocess.run([SLURM_LOCAL, 'stop'], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope='module')
def repo(tmp_path_factory):
    return make_clone(tmp_path_factory.mktemp('slurm_clone') / 'repo')


@pytest.fixture(scope='module')
def exp(tmp_path_factory):
    root = tmp_path_factory.mktemp('slurm_exp')
    (root / 'cwd').mkdir()
    return root


def submit(repo, exp, *args):
    """run.sh NAME run_with_submitit.py ... -> the Slurm job ids it printed."""
    env = {**os.environ, 'PYTHON': sys.executable, 'EXP_ROOT': str(exp), 'WANDB_MODE': 'offline'}
    for key in ('VIRTUAL_ENV', 'OMP_NUM_THREADS', 'MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE'):
        env.pop(key, None)
    proc = subprocess.run([os.path.join(repo, 'run.sh'), *args], cwd=exp / 'cwd', env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.findall(r'submitted job (\d+)', proc.stdout)


def job_info(job):
    out = subprocess.run(['scontrol', 'show', 'job', '-o', job], capture_output=True, text=True).stdout
    return dict(re.findall(r'(\w+)=(\S*)', out))


def logs(out_dir, tail=2000):
    """submitit's per-task logs of every job that wrote to out_dir (the last `tail` chars of each)."""
    folder = os.path.join(out_dir, 'submitit')
    text = ''
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(('.out', '.err')):
            content = open(os.path.join(folder, name), errors='replace').read()
            text += f'\n== {name}\n' + (content[-tail:] if tail else content)
    return text


def wait_done(job, out_dir, timeout=360):
    t0 = time.time()
    while time.time() - t0 < timeout:
        info = job_info(job)
        if info.get('JobState') in DONE:
            assert info['JobState'] == 'COMPLETED', f'job {job}: {info["JobState"]}' + logs(out_dir)
            return
        time.sleep(1)
    subprocess.run(['scancel', job])
    # A job that never started says why (e.g. Reason=PartitionConfig when the node registered fewer CPUs
    # than the job's tasks: slurmd counts only the CPUs this process may use, so under taskset).
    pytest.fail(f'job {job} not finished after {timeout} s (JobState={info.get("JobState")}, '
                f'Reason={info.get("Reason")}, CPUs this process may use: {len(os.sched_getaffinity(0))})'
                + logs(out_dir))


def wait_for(predicate, what, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f'timed out after {timeout} s waiting for {what}')


def logged_step(out):
    """The last step in OUT/log_steps.txt (-1 before the first)."""
    try:
        lines = open(os.path.join(out, 'log_steps.txt')).read().splitlines()
        return int(re.search(r'"step": (\d+)', lines[-1]).group(1)) if lines else -1
    except (OSError, AttributeError):
        return -1


def ckpt_step(path):
    try:
        return torch.load(path, weights_only=True)['step']
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1


def out_dir(repo, exp, name, job=None):
    return os.path.join(exp, name, git(repo, 'rev-parse', '--short', 'HEAD').strip(), job or name)


@pytest.fixture(scope='module')
def straight(slurm, repo, exp):
    """An uninterrupted 2-task run: the reference."""
    (job,) = submit(repo, exp, 'straight', 'run_with_submitit.py', *TWO_TASKS)
    out = out_dir(repo, exp, 'straight')
    wait_done(job, out)
    return out


def assert_ends_as_uninterrupted(straight, ckpt, optimizer=True):
    """The job's final checkpoint equals the uninterrupted run's: step 16, bit-identical weights
    (and optimizer state)."""
    a = torch.load(os.path.join(straight, 'checkpoint.pt'), weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a['step'] == b['step'] == 16
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for i in a['optimizer']['state'] if optimizer else ():
        for k in a['optimizer']['state'][i]:
            assert torch.equal(a['optimizer']['state'][i][k], b['optimizer']['state'][i][k]), (i, k)


def test_two_task_gloo_job_runs_to_completion(straight):
    log = open(os.path.join(straight, 'log.txt')).read().splitlines()
    assert len(log) == 2 and '"epoch": 2' in log[-1] and '"shapes_top1"' in log[-1]
    ckpt = torch.load(os.path.join(straight, 'checkpoint.pt'), weights_only=True)
    assert ckpt['step'] == 16 and ckpt['epoch'] == 2
    task0 = logs(straight, tail=None)
    assert '2 process(es)' in task0 and 'global_rank=1(2)' in task0
    command = open(os.path.join(straight, 'command.txt')).read().splitlines()
    assert 'run_with_submitit.py' in command[0] and '--tasks-per-node 2' in command[0]


def test_requeued_job_equals_uninterrupted_one(slurm, repo, exp, straight):
    (job,) = submit(repo, exp, 'requeued', 'run_with_submitit.py', *TWO_TASKS)
    out = out_dir(repo, exp, 'requeued')
    ckpt = os.path.join(out, 'checkpoint.pt')
    wait_for(lambda: ckpt_step(ckpt) >= 2, 'the first step checkpoint')
    # what Slurm sends --signal-delay-s before the time limit: rank 0 calls Trainer.checkpoint()
    # and requeues the job itself
    subprocess.run(['scancel', '--signal=USR2', job], check=True)
    wait_for(lambda: int(job_info(job).get('Restarts', 0)) >= 1, 'the first requeue')
    first = ckpt_step(ckpt)
    wait_for(lambda: job_info(job).get('JobState') == 'RUNNING' and ckpt_step(ckpt) > first
             or job_info(job).get('JobState') in DONE, 'the restarted job to checkpoint')
    if job_info(job).get('JobState') == 'RUNNING':                      # a preemption (unless
        if subprocess.run(['scontrol', 'requeue', job]).returncode == 0:  # it just finished)
            wait_for(lambda: int(job_info(job).get('Restarts', 0)) >= 2, 'the second requeue')
    wait_done(job, out)
    text = logs(out, tail=None)
    resumed = [int(s) for s in re.findall(r'resumed from \S+: epoch \d+, step (\d+)', text)]
    assert resumed and resumed[0] < 16, logs(out)
    assert 'Calling checkpoint method' in text
    assert_ends_as_uninterrupted(straight, ckpt)


def test_usr1_stops_checkpoints_requeues_and_loses_no_step(slurm, repo, exp, straight):
    (job,) = submit(repo, exp, 'usr1', 'run_with_submitit.py', *TWO_TASKS)
    out = out_dir(repo, exp, 'usr1')
    ckpt = os.path.join(out, 'checkpoint.pt')
    wait_for(lambda: ckpt_step(ckpt) >= 2, 'the first step checkpoint')
    subprocess.run(['scancel', '--signal=USR1', job], check=True)      # to every task of the job
    wait_for(lambda: int(job_info(job).get('Restarts', 0)) >= 1, 'the requeue after SIGUSR1')
    wait_done(job, out)
    text = logs(out, tail=None)
    stopped = [int(s) for s in re.findall(r'received SIGUSR1: checkpoint saved at step (\d+)', text)]
    resumed = [int(s) for s in re.findall(r'resumed from \S+: epoch \d+, step (\d+)', text)]
    assert stopped and 'SIGUSR1: checkpoint written; requeued job' in text, text
    assert resumed == [stopped[0]] and stopped[0] < 16, text   # resumed at the stop: no step redone
    assert_ends_as_uninterrupted(straight, ckpt, optimizer=False)


def test_scancel_with_loader_workers_checkpoints_its_step_and_the_resubmitted_job_loses_none(
        slurm, repo, exp, straight):
    """A plain `scancel JOB` -- what a user and a preemption do -- makes Slurm send SIGCONT and
    SIGTERM to every process of every step, the loader workers of both tasks included (SIGKILL
    follows after KillWait). (`scancel --signal=TERM` only delivers a signal, to the steps and
    not the batch script unless --full; it does not end the job.) The tasks finish the step and
    checkpoint it; the same command submitted again resumes there and ends as the uninterrupted
    run (which has no loader workers: the batches do not depend on them)."""
    flags = [*TWO_TASKS, '--workers', '1', '--save-freq-steps', '0']     # only the stop checkpoints
    (job,) = submit(repo, exp, 'scancel', 'run_with_submitit.py', *flags)
    out = out_dir(repo, exp, 'scancel')
    ckpt = os.path.join(out, 'checkpoint.pt')
    wait_for(lambda: logged_step(out) >= 3, 'step 3')
    subprocess.run(['scancel', job], check=True)
    wait_for(lambda: job_info(job).get('JobState') in DONE, 'the cancelled job to end')
    text = logs(out, tail=None)
    stopped = [int(s) for s in re.findall(r'received SIGTERM: checkpoint saved at step (\d+)', text)]
    assert stopped and 3 <= stopped[0] < 16 and ckpt_step(ckpt) == stopped[0], text
    assert 'killed by signal' not in text and logged_step(out) == stopped[0], text
    (again,) = submit(repo, exp, 'scancel', 'run_with_submitit.py', *flags)
    wait_done(again, out)
    text = logs(out, tail=None)
    resumed = [int(s) for s in re.findall(r'resumed from \S+: epoch \d+, step (\d+)', text)]
    assert resumed == [stopped[0]], text                       # resumed at the stop: no step lost
    assert_ends_as_uninterrupted(straight, ckpt)


def test_seed_sweep_gives_three_finished_experiments(slurm, repo, exp):
    jobs = submit(repo, exp, 'sweep', 'run_with_submitit.py', *FLAGS, '--epochs', '1', '--seed', '0,1,2',
                  '--shapes-num-train', '256')                    # 1 task: 8 steps
    assert len(jobs) == 3
    outs = [out_dir(repo, exp, 'sweep', f'sweep_seed{s}') for s in range(3)]
    for job, out in zip(jobs, outs):
        wait_done(job, out)
    weights = []
    for seed, out in enumerate(outs):
        ckpt = torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)
        assert ckpt['step'] == 8 and ckpt['args']['seed'] == seed
        assert os.path.isfile(os.path.join(out, 'log.txt'))
        weights.append(next(iter(ckpt['model'].values())))
    assert not torch.equal(weights[0], weights[1])

"""Launch main.py on Slurm through submitit; the job requeues itself on timeout or preemption
and resumes from OUTPUT_DIR/checkpoint.pt; SIGUSR1 (`#SBATCH --signal=USR1@N`, or
`scancel --signal=USR1 JOB`) stops every task after its step, checkpoints and requeues.

    python run_with_submitit.py --nodes 4 --ngpus 8 --model CL2L_R50_CL2L ... [main.py flags]
    python run_with_submitit.py --ngpus 0 --tasks-per-node 2 --cpus-per-task 1 --output-dir runs/x

Every main.py flag is accepted; the Slurm flags are below. The arguments are checked here, on the
submitting machine (a bad --model fails at once), and resolved again inside the job, so that
defaults that depend on the node (fp16 AMP with CUDA, fp32 without) follow the compute node.
The job runs this checkout's code (its directory goes on the job's PYTHONPATH) with this Python,
in the current directory, so both must be visible from the compute nodes (a shared file system).
"""
import copy
import os
import shutil
import signal
import subprocess
import sys

import main as trainer
import utils

CODE_DIR = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    parser = utils.OneLineErrorParser('run_with_submitit.py', parents=[trainer.get_args_parser()],
                                      description='Train on Slurm through submitit.')
    g = parser.add_argument_group('slurm')
    g.add_argument('--nodes', type=int, default=1, help='nodes to request (1)')
    g.add_argument('--ngpus', type=int, default=8,
                   help='GPUs per node = tasks per node (8); 0 for CPU-only nodes')
    g.add_argument('--tasks-per-node', type=int, default=None,
                   help='processes per node (default: --ngpus, or 1 with --ngpus 0)')
    g.add_argument('--cpus-per-task', type=int, default=10, help='CPU cores per task (10)')
    g.add_argument('--mem-per-gpu', type=int, default=None,
                   help='memory per GPU in GB (default: the partition default)')
    g.add_argument('--mem-gb', type=int, default=None,
                   help='memory per node in GB (overrides --mem-per-gpu; default: the partition default)')
    g.add_argument('--timeout', type=int, default=2800, help='job time limit in minutes (2800)')
    g.add_argument('--partition', default=None, help='Slurm partition (default: the cluster default)')
    g.add_argument('--constraint', default=None, help='Slurm --constraint, e.g. volta32gb')
    g.add_argument('--use-volta32', '--use_volta32', action='store_true', help='upstream alias for --constraint volta32gb')
    g.add_argument('--comment', default=None, help='Slurm job comment')
    g.add_argument('--exclude', default=None, help='nodes to exclude (Slurm node list)')
    g.add_argument('--job-dir', '--job_dir', default=None,
                   help="submitit's logs and pickles (default: OUTPUT_DIR/submitit)")
    g.add_argument('--job-name', default=None, help='Slurm job name (default: the output directory name)')
    g.add_argument('--signal-delay-s', type=int, default=120,
                   help='seconds before the time limit at which the job checkpoints and requeues (120)')
    return parser


class Trainer:
    """The picklable callable a submitit job runs: main.main() on the given flags, in every task.

    On timeout submitit calls checkpoint() (global rank 0) and requeues the job with what it
    returns: the same flags. On preemption Slurm requeues the job with the pickle it has. Either
    way the next start resumes from OUTPUT_DIR/checkpoint.pt, the last checkpoint written (an
    epoch end, or every --save-freq-steps optimizer steps). On SIGUSR1 every task finishes its
    step, the checkpoint of that step is written and the job requeues itself (requeue_this_job):
    no step is recomputed.
    """

    def __init__(self, args, argv=None):
        self.args = args          # parsed, not resolved: resolved on the compute node
        self.argv = list(argv) if argv is not None else None

    def __call__(self):
        import main
        args = copy.deepcopy(self.args)
        latest = os.path.join(args.output_dir, 'checkpoint.pt')
        if args.resume and os.path.isfile(latest):
            print(f"requeued: resuming from {latest}, not --resume {args.resume}")
            args.resume = ''      # main resumes from OUTPUT_DIR/checkpoint.pt
        cpus = os.environ.get('SLURM_CPUS_PER_TASK')
        if cpus and 'OMP_NUM_THREADS' not in os.environ:
            import torch
            torch.set_num_threads(int(cpus))      # torch would use every core of the node
        if self.argv is not None:                 # command.txt records the submitting command
            sys.argv = [os.path.join(CODE_DIR, 'run_with_submitit.py'), *self.argv]
        try:
            return main.main(args=args)
        except SystemExit as e:
            if e.code == 128 + signal.SIGUSR1:    # graceful stop: the checkpoint is written
                requeue_this_job()
            raise

    def checkpoint(self):
        import submitit
        print("timeout or preemption: requeuing; the job resumes from OUTPUT_DIR/checkpoint.pt")
        return submitit.helpers.DelayedSubmission(type(self)(self.args, self.argv))


def requeue_this_job():
    """After a SIGUSR1 stop (`sbatch --signal=USR1@N`, or `scancel --signal=USR1 JOB`): every
    task has stopped at the same step and the checkpoint is on disk; global rank 0 requeues the
    job (`scontrol requeue`), which restarts it from that checkpoint. SIGTERM (scancel, a
    preemption that Slurm requeues by itself) only stops."""
    import submitit
    env = submitit.JobEnvironment()
    if env.global_rank != 0:
        return
    try:
        subprocess.run(['scontrol', 'requeue', env.job_id], check=True, timeout=60,
                       capture_output=True, text=True)
        print(f"SIGUSR1: checkpoint written; requeued job {env.job_id}, it resumes from OUTPUT_DIR/checkpoint.pt")
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, 'stderr', None) or e
        print(f"SIGUSR1: checkpoint written, but the job could not be requeued ({str(detail).strip()}); "
              f"resubmit the same command to resume")


def check_args(args):
    """Slurm flags and main.py flags, before anything is submitted. Raises ValueError."""
    for key in ('nodes', 'cpus_per_task', 'timeout'):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.ngpus < 0:
        raise ValueError(f"--ngpus must be >= 0, got {args.ngpus}")
    if args.tasks_per_node is None:
        args.tasks_per_node = args.ngpus or 1
    if args.tasks_per_node < 1:
        raise ValueError(f"--tasks-per-node must be >= 1, got {args.tasks_per_node}")
    if args.use_volta32 and args.constraint not in (None, 'volta32gb'):
        raise ValueError("--use-volta32 means --constraint volta32gb; give one of the two")
    if args.use_volta32:
        args.constraint = 'volta32gb'
    for key in ('mem_gb', 'mem_per_gpu'):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1 (GB)")
    for key in ('output_dir', 'resume', 'job_dir'):   # the job may start elsewhere: absolute paths
        if getattr(args, key):
            setattr(args, key, os.path.abspath(getattr(args, key)))
    args.job_dir = args.job_dir or os.path.join(args.output_dir, 'submitit')
    args.job_name = args.job_name or os.path.basename(args.output_dir.rstrip('/')) or 'vlp'
    trainer.resolve_args(copy.deepcopy(args))     # main.py's own checks (model name, values, ...)


def executor_parameters(args):
    """submitit.AutoExecutor.update_parameters() keywords for these flags."""
    params = dict(name=args.job_name, nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                  cpus_per_task=args.cpus_per_task, timeout_min=args.timeout,
                  slurm_signal_delay_s=args.signal_delay_s,
                  slurm_setup=[f'export PYTHONPATH={CODE_DIR}${{PYTHONPATH:+:$PYTHONPATH}}'])
    if args.ngpus:                                   # none on CPU-only nodes: no gres request
        params['gpus_per_node'] = args.ngpus
    if args.mem_gb or args.mem_per_gpu:
        params['mem_gb'] = args.mem_gb or args.mem_per_gpu * max(args.ngpus, 1)
    optional = dict(slurm_partition=args.partition, slurm_constraint=args.constraint,
                    slurm_comment=args.comment, slurm_exclude=args.exclude)
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        parser.error(str(e))
    if shutil.which('sbatch') is None:
        parser.error("sbatch not found: not a Slurm submit host (a local one: tools/slurm_local.sh start)")
    import submitit
    os.makedirs(args.job_dir, exist_ok=True)
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster='slurm', slurm_max_num_timeout=30)
    executor.update_parameters(**executor_parameters(args))
    try:
        job = executor.submit(Trainer(args, argv))
    except submitit.core.utils.FailedJobError as e:        # sbatch said no (resources, partition...)
        lines = str(e).strip().splitlines() or ['no message']
        parser.error(f"sbatch refused the job: {lines[-1]}")
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {args.tasks_per_node} task(s), "
          f"{args.ngpus} GPU(s) per node")
    print(f"outputs: {args.output_dir}  (a requeued job resumes from its checkpoint.pt)")
    print(f"logs:    {job.paths.stdout}  {job.paths.stderr}")
    return job


if __name__ == '__main__':
    # Import this file as the module `run_with_submitit` so that the job's pickle names
    # run_with_submitit.Trainer (importable on the node through PYTHONPATH), not __main__.Trainer.
    import run_with_submitit
    run_with_submitit.main()

"""Launch main.py on Slurm through submitit (requeues itself on timeout or preemption).

    python run_with_submitit.py --nodes 4 --ngpus 8 --model CL2L_R50_CL2L ... [main.py flags]

Every main.py flag is accepted; the Slurm flags are below. (Work in progress: parser only.)
"""
import argparse

import main as trainer
import utils


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
    g.add_argument('--timeout', type=int, default=2800, help='job time limit in minutes (2800)')
    g.add_argument('--partition', default=None, help='Slurm partition (default: the cluster default)')
    g.add_argument('--constraint', default=None, help='Slurm --constraint, e.g. volta32gb')
    g.add_argument('--use-volta32', action='store_true', help='upstream alias for --constraint volta32gb')
    g.add_argument('--comment', default=None, help='Slurm job comment')
    g.add_argument('--exclude', default=None, help='nodes to exclude (Slurm node list)')
    g.add_argument('--job-dir', '--job_dir', default=None,
                   help="submitit's logs and pickles (default: OUTPUT_DIR/submitit)")
    return parser

"""Train every method on the embedded `shapes` set with a small CPU budget and print a
markdown table: method, zero-shot top-1 on the held-out split (z head), training minutes.

    python bench/methods_shapes.py [--epochs 5 --train-num-samples 12800] [--methods CLIP CL2L ...]

Each run is `python main.py --dataset shapes --model <BASE>_TINYCNN_<METHOD> ...` in a fresh
output directory; CL2L-based methods get 2 augmented views, --separate-proj, --text-augment
and 2 data-loading workers.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {'CLIP': 'CLIP_TINYCNN_CLIP', 'SIGLIP': 'CLIP_TINYCNN_SIGLIP', 'CL2L': 'CL2L_TINYCNN_CL2L',
        'SIAMLIP': 'CL2L_TINYCNN_SIAMLIP', 'BYOLIP': 'CL2L_TINYCNN_BYOLIP',
        'BARLIP': 'CL2L_TINYCNN_BARLIP', 'SWALIP': 'CL2L_TINYCNN_SWALIP'}


def run(method, args, out_dir):
    model = RUNS[method]
    cmd = [sys.executable, os.path.join(ROOT, 'main.py'), '--model', model,
           '--output-dir', out_dir, '--epochs', str(args.epochs),
           '--train-num-samples', str(args.train_num_samples), '--eval-freq', str(args.epochs)]
    if model.startswith('CL2L'):
        # the views' per-sample augmentations are the CPU cost: decode them in 2 workers
        cmd += ['--separate-proj', '--text-augment', '--num-augs', '2', '--workers', '2']
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, 'WANDB_MODE': 'offline'})
    with open(os.path.join(out_dir, 'log.txt')) as f:
        last = [json.loads(line) for line in f][-1]
    return last['shapes_top1'], last['train_time_s'] / 60, last['train_samples_per_s']


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--methods', nargs='+', default=list(RUNS), choices=list(RUNS))
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--train-num-samples', type=int, default=12800)
    args = parser.parse_args()
    print('| method | model | zero-shot top-1 (shapes held-out) | training min | samples/s |')
    print('|---|---|---|---|---|')
    for method in args.methods:
        with tempfile.TemporaryDirectory() as out:
            top1, minutes, speed = run(method, args, out)
        print(f'| {method} | `{RUNS[method]}` | {top1:.1f} % | {minutes:.1f} | {speed:.0f} |', flush=True)


if __name__ == '__main__':
    main()

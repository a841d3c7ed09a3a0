"""Scaling: training-step time vs batch size and image size; contrastive-loss memory and time
vs global batch for the naive full similarity matrix, the local loss and a chunked loss.

    python bench/scaling.py                   # both parts + bench/scaling.png
    python bench/scaling.py --quick           # smoke run: small sizes
    python bench/scaling.py --part loss       # only the loss part

Step part: our real step (train_step.py) for `--model` (default CLIP_VITS16_CLIP: a ViT-B/16
step at batch 64 takes minutes on 2 shared cores), text 512 x 12 x 8, realistic captions.
Batch sizes run round-robin in one process (one model); image sizes need one model each
(the ViT's position embedding), also round-robin.

Loss part: gathered features are random [N, 512] unit vectors (no towers). Per (mode, N),
a fresh subprocess builds the features, runs forward + backward `--loss-reps` times and
reports the median time and peak RSS above the RSS with the features allocated.
  naive   : our CLIPLoss in one process on all N samples = the full N x N logits in both
            directions (what OpenCLIP's ClipLoss does without local_loss).
  local   : our CLIPLoss as one of R = N / b simulated ranks (b = --local-batch): its own b
            rows against the N gathered features (gather patched to return them), b x N
            logits; the time is per rank (all R ranks run in parallel).
  chunked : all N rows in one process, in row chunks of --chunk: each chunk's logits,
            cross-entropy and backward, gradients accumulated (exact, memory chunk x N).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_arms as ts  # noqa: E402  (the arms of train_step.py)
import losses  # noqa: E402  (step_arms put the repository on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
DIM = 512


# ----------------------------------------------------------------------------- loss part

def features(n, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, DIM, generator=g), dim=-1).requires_grad_(grad)
    txt = F.normalize(torch.randn(n, DIM, generator=g), dim=-1).requires_grad_(grad)
    scale = torch.tensor(math.log(1 / 0.07)).requires_grad_(grad)
    return img, txt, scale


def naive_loss(img, txt, scale):
    loss = losses.CLIPLoss()({'image_embed': img, 'text_embed': txt, 'logit_scale': scale.exp()})['loss']
    loss.backward()
    return float(loss.detach())


def local_loss(img, txt, scale, b, rank=None):
    """This rank's CLIPLoss: rows [rank*b, (rank+1)*b) against all N gathered features. The
    gather is patched to splice the local (differentiable) rows into the other ranks' rows."""
    n = img.shape[0]
    rank = (n // b) // 2 if rank is None else rank
    lo, hi = rank * b, (rank + 1) * b
    li, lt = img[lo:hi].detach().requires_grad_(), txt[lo:hi].detach().requires_grad_()
    others = {id(li): img.detach(), id(lt): txt.detach()}

    def gather(x):
        full = others[id(x)]
        return torch.cat([full[:lo], x, full[hi:]])
    with mock.patch.object(losses, 'gather_with_grad', gather), \
            mock.patch.object(losses.utils, 'get_rank', lambda: rank):
        loss = losses.CLIPLoss()({'image_embed': li, 'text_embed': lt, 'logit_scale': scale.exp()})['loss']
    loss.backward()
    return float(loss.detach()), li.grad, lt.grad


def chunked_loss(img, txt, scale, chunk):
    """The full-batch CLIP loss (mean of both directions) and its exact gradients, computing
    the N x N logits `chunk` rows at a time (each chunk backpropagated before the next)."""
    n = img.shape[0]
    total = 0.0
    for q, k in ((img, txt), (txt, img)):              # image->text, then text->image rows
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits = scale.exp() * q[s:e] @ k.t()      # [chunk, N]
            labels = torch.arange(s, e)
            part = F.cross_entropy(logits, labels, reduction='sum') / (2 * n)
            part.backward()
            total += float(part.detach())
    return total


def check_chunked(n=512, chunk=128, b=128):
    """Chunked = naive in value and gradients; local rows' gradients = naive's rows (up to
    the other ranks' contributions, which the real all-gather backward adds)."""
    a = features(n)
    naive = naive_loss(*a)
    c = features(n)
    chunked = chunked_loss(*c, chunk)
    assert abs(naive - chunked) < 1e-4, (naive, chunked)
    for x, y in ((a[0], c[0]), (a[1], c[1]), (a[2], c[2])):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)
    # local loss: the average over ranks of the per-rank losses equals the full loss
    per_rank = [local_loss(*features(n, grad=False), b, rank=r)[0] for r in range(n // b)]
    assert abs(statistics.mean(per_rank) - naive) < 1e-4, (per_rank, naive)


def rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def loss_child(mode, n, reps, chunk, b):
    def run(img, txt, scale):
        for t in (img, txt, scale):
            t.grad = None
        t0 = time.perf_counter()
        if mode == 'naive':
            naive_loss(img, txt, scale)
        elif mode == 'local':
            local_loss(img, txt, scale, min(b, img.shape[0]))
        else:
            chunked_loss(img, txt, scale, min(chunk, img.shape[0]))
        return time.perf_counter() - t0
    run(*features(256))                                # warm-up (threads, first-call costs)
    img, txt, scale = features(n)
    base = rss_mb()
    times = [run(img, txt, scale) for _ in range(reps)]
    peak = ts.peak_rss_mb()
    print(json.dumps({'mode': mode, 'n': n, 'time': statistics.median(times), 'times': times,
                      'mem_mb': peak - base}))


def loss_part(args):
    check_chunked()
    print('chunked and local losses checked against the naive loss (values and gradients)')
    sizes = [2 ** k for k in range(int(math.log2(args.loss_min)), int(math.log2(args.loss_max)) + 1)]
    res = {m: {} for m in ('naive', 'local', 'chunked')}
    for n in sizes:
        for mode in ('naive', 'local', 'chunked'):
            if mode == 'naive':
                need = 5 * n * n * 4 / 2 ** 30            # ~4.3 [N, N] fp32 buffers measured at N=8192
                if need > args.max_naive_gb:
                    print(f'  naive N={n}: skipped (needs ~{need:.0f} GB > --max-naive-gb {args.max_naive_gb})')
                    continue
            cmd = [sys.executable, __file__, '--loss-child', mode, str(n), '--loss-reps',
                   str(args.loss_reps if n < 16384 else 1), '--chunk', str(args.chunk),
                   '--local-batch', str(args.local_batch), '--threads', str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            res[mode][n] = r
            print(f"  {mode:7s} N={n:6d}: {r['time']:.3f} s, {r['mem_mb']:.0f} MB", flush=True)
    print(f'\n| global batch N | naive time (s) | naive mem (MB) | local time per rank (s) | '
          f'local mem per rank (MB) | chunked time (s) | chunked mem (MB) |')
    print('|---|---|---|---|---|---|---|')
    for n in sizes:
        cells = []
        for mode in ('naive', 'local', 'chunked'):
            r = res[mode].get(n)
            cells += [f"{r['time']:.3f}", f"{r['mem_mb']:.0f}"] if r else ['skipped', 'skipped']
        print(f'| {n} | ' + ' | '.join(cells) + ' |')
    return res


# ----------------------------------------------------------------------------- step part

def step_part(args):
    tok_batches = {}
    text = dict(ts.TEXT_B16)
    print(f'\n## step time vs batch size ({args.model}, {args.image_size_ref} px)')
    big = max(args.batch_sizes)
    pool = ts.make_batches(big, args.image_size_ref, 2)
    for bs in args.batch_sizes:
        tok_batches[bs] = [{k: v[:bs] for k, v in b.items()} for b in pool]
    arm = ts.build_ours(args.model, tok_batches[big], image_size=args.image_size_ref, **text)
    arms = []
    for bs in args.batch_sizes:          # one model: arms share it, each with its batch size
        a = ts.Arm(f'batch {bs}', arm._step, tok_batches[bs], arm.model)
        arms.append(a)
    ts.interleave(arms, args.steps, warmup=1)
    by_batch = {bs: ts.summary(a, bs) for bs, a in zip(args.batch_sizes, arms)}
    print(f'\n## step time vs image size ({args.model}, batch {args.batch_ref})')
    arms = []
    for size in args.image_sizes:
        batches = ts.make_batches(args.batch_ref, size, 2)
        arms.append(ts.build_ours(args.model, batches, f'{size} px', image_size=size, **text))
    ts.interleave(arms, args.steps, warmup=1)
    by_size = {s: ts.summary(a, args.batch_ref) for s, a in zip(args.image_sizes, arms)}
    del arms
    print('\n| batch | step median (s) | min / max | ms / sample | GFLOP/step | samples/s |')
    print('|---|---|---|---|---|---|')
    for bs, r in by_batch.items():
        print(f"| {bs} | {r['median']:.2f} | {r['min']:.2f} / {r['max']:.2f} | "
              f"{1000 * r['median'] / bs:.0f} | {r['flops'] / 1e9:.0f} | {r['samples_per_s']:.2f} |")
    print('\n| image size | step median (s) | min / max | ms / sample | GFLOP/step | samples/s |')
    print('|---|---|---|---|---|---|')
    for s, r in by_size.items():
        print(f"| {s} | {r['median']:.2f} | {r['min']:.2f} / {r['max']:.2f} | "
              f"{1000 * r['median'] / args.batch_ref:.0f} | {r['flops'] / 1e9:.0f} | {r['samples_per_s']:.2f} |")
    return by_batch, by_size


def plot(path, step_res, loss_res, args):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [r for r in (step_res, loss_res) if r]
    fig, ax = plt.subplots(len(rows), 2, figsize=(11, 4 * len(rows)), squeeze=False)
    if step_res:
        by_batch, by_size = step_res
        ax[0, 0].plot(list(by_batch), [1000 * r['median'] / b for b, r in by_batch.items()], 'o-')
        ax[0, 0].set(xscale='log', xlabel='batch size', ylabel='ms / sample (median step)',
                     title=f'{args.model}, {args.image_size_ref} px')
        ax[0, 0].set_xticks(list(by_batch), [str(b) for b in by_batch])
        ax[0, 1].plot(list(by_size), [1000 * r['median'] / args.batch_ref for r in by_size.values()], 'o-')
        ax[0, 1].set(xlabel='image size (px)', ylabel='ms / sample (median step)',
                     title=f'{args.model}, batch {args.batch_ref}')
    lr = len(rows) - 1
    if loss_res:
        for mode, style in (('naive', 'o-'), ('local', 's-'), ('chunked', '^-')):
            pts = sorted(loss_res[mode].items())
            if not pts:
                continue
            label = {'naive': 'naive N x N', 'local': f'local, per rank (b={args.local_batch})',
                     'chunked': f'chunked ({args.chunk} rows)'}[mode]
            ax[lr, 0].plot([n for n, _ in pts], [r['mem_mb'] for _, r in pts], style, label=label)
            ax[lr, 1].plot([n for n, _ in pts], [r['time'] for _, r in pts], style, label=label)
        for a, yl in ((ax[lr, 0], 'peak memory above features (MB)'),
                      (ax[lr, 1], 'forward + backward (s)')):
            a.set(xscale='log', yscale='log', xlabel='global batch N', ylabel=yl,
                  title='CLIP loss, D = 512, fp32 CPU')
            a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f'plot: {path}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--part', choices=['all', 'step', 'loss'], default='all')
    p.add_argument('--model', default='CLIP_VITS16_CLIP')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[8, 16, 32, 64])
    p.add_argument('--image-sizes', type=int, nargs='+', default=[112, 160, 224])
    p.add_argument('--image-size-ref', type=int, default=224, help='image size of the batch sweep')
    p.add_argument('--batch-ref', type=int, default=16, help='batch size of the image-size sweep')
    p.add_argument('--steps', type=int, default=4, help='timed steps per setting (interleaved)')
    p.add_argument('--loss-min', type=int, default=1024)
    p.add_argument('--loss-max', type=int, default=32768)
    p.add_argument('--loss-reps', type=int, default=3)
    p.add_argument('--chunk', type=int, default=1024, help='rows per chunk (chunked loss)')
    p.add_argument('--local-batch', type=int, default=256, help='per-rank batch b (local loss)')
    p.add_argument('--max-naive-gb', type=float, default=8.0, help='skip naive sizes needing more')
    p.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument('--plot', default=os.path.join(HERE, 'scaling.png'))
    p.add_argument('--quick', action='store_true')
    p.add_argument('--loss-child', nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.loss_child:
        return loss_child(args.loss_child[0], int(args.loss_child[1]), args.loss_reps, args.chunk,
                          args.local_batch)
    if args.quick:
        args.batch_sizes, args.image_sizes, args.steps = [2, 4], [64, 112], 1
        args.image_size_ref, args.batch_ref = 112, 2
        args.loss_max, args.loss_reps = 4096, 1
    print(f'# scaling: {ts.machine_note(args.threads)}')
    step_res = step_part(args) if args.part in ('all', 'step') else None
    loss_res = loss_part(args) if args.part in ('all', 'loss') else None
    print(f'\nafter: {ts.machine_note(args.threads)}')
    plot(args.plot, step_res, loss_res, args)
    if loss_res:
        n = max(loss_res['chunked'])
        nv = max(loss_res['naive']) if loss_res['naive'] else None
        msg = f"loss at N={n}: chunked {loss_res['chunked'][n]['mem_mb']:.0f} MB, local per rank " \
              f"{loss_res['local'][n]['mem_mb']:.0f} MB"
        if nv:
            msg += (f"; naive needs {loss_res['naive'][nv]['mem_mb']:.0f} MB already at N={nv} "
                    f"(chunked {loss_res['chunked'][nv]['mem_mb']:.0f} MB there: "
                    f"{loss_res['naive'][nv]['mem_mb'] / max(1, loss_res['chunked'][nv]['mem_mb']):.1f}x less)")
        print(msg)


if __name__ == '__main__':
    main()

"""Speed levers of our training step (`python bench/train_step.py --levers ...`): each one
times a variant of one piece against the code path main.py takes. See train_step.py."""
import itertools
import os
import statistics
import sys
import tempfile
import time

import torch

from step_arms import DEVICE, OPT, ROOT, TEXT_B16, build_ours, make_batches, token_stats
import datasets  # noqa: E402  (step_arms put the repository on sys.path)
import engine  # noqa: E402
import losses  # noqa: E402
import main as train_main  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402


def _median_times(fns, rounds):
    """{label: ([wall seconds], [process CPU seconds])} of zero-argument callables,
    interleaved (order rotated), after one untimed call each."""
    labels = list(fns)
    for f in fns.values():
        f()
    times = {k: ([], []) for k in labels}
    for r in range(rounds):
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            c, t = time.process_time(), time.perf_counter()
            fns[k]()
            times[k][0].append(time.perf_counter() - t)
            times[k][1].append(time.process_time() - c)
    return times


def _lever_rows(title, times, ref):
    print(f'\n{title}')
    print(f'| variant | wall min / median / max (s) | CPU s (median) | vs {ref}: wall median / CPU |')
    print('|---|---|---|---|')
    base, base_cpu = (statistics.median(x) for x in times[ref])
    for k, (t, c) in times.items():
        med, cpu = statistics.median(t), statistics.median(c)
        print(f'| {k} | {min(t):.3f} / {med:.3f} / {max(t):.3f} | {cpu:.3f} | '
              f'{base / med:.2f}x / {base_cpu / max(cpu, 1e-9):.2f}x |')


def lever_optimizer(rounds):
    """AdamW.step() on the ViT-B/16 CLIP parameters (149.6 M) with fixed random gradients."""
    model = models.create_model('CLIP_VITB16_CLIP', **TEXT_B16)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    groups = models.param_groups(model, OPT.wd)
    kw = dict(lr=OPT.lr, betas=OPT.betas, eps=OPT.eps)
    opts = {'for-loop (CPU default)': torch.optim.AdamW(groups, foreach=False, **kw),
            'foreach': torch.optim.AdamW(groups, foreach=True, **kw),
            'fused (ours)': torch.optim.AdamW(groups, fused=True, **kw)}
    times = _median_times({k: o.step for k, o in opts.items()}, rounds)
    _lever_rows('AdamW step, ViT-B/16 CLIP parameters', times, 'for-loop (CPU default)')
    return times


def lever_guard(batch_size, rounds):
    """Host-side pieces of our step after backward: the NaN/inf guard (a norm per gradient,
    one bool()), the terms -> float conversions (MetricLogger), vs a one-kernel guard."""
    batches = make_batches(batch_size, 224, 1)
    arm = build_ours('CLIP_VITB16_CLIP', batches, **TEXT_B16)
    model, loss_fn = arm.model, losses.CLIPLoss()
    terms = loss_fn(model(batches[0]))
    terms['loss'].backward()
    opt = train_main.build_optimizer(model, OPT)
    grads = [p.grad for p in model.parameters() if p.grad is not None]

    def foreach_guard():
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
    fns = {'engine.grads_finite': lambda: engine.grads_finite(terms['loss'], opt),
           'torch._foreach_norm guard': foreach_guard,
           'terms to floats': lambda: {k: float(v) for k, v in terms.items()},
           'after_step (logit clamp)': lambda: model.after_step()}
    times = _median_times(fns, rounds)
    _lever_rows(f'host-side pieces of our step (ViT-B/16, batch {batch_size})', times,
                'engine.grads_finite')
    return times


def lever_channels_last(batch_size, rounds):
    """Our R50 step with the preset's channels_last vs contiguous NCHW."""
    import dataclasses
    batches = make_batches(batch_size, 224, 2)
    over = dict(TEXT_B16, embed_dim=1024)
    cl = build_ours('CLIP_R50_CLIP', batches, **over)
    nchw = build_ours('CLIP_R50_CLIP', batches, **over)
    nchw.model.backbone_cfg = dataclasses.replace(nchw.model.backbone_cfg, channels_last=False)
    nchw.model.visual.to(memory_format=torch.contiguous_format)
    times = _median_times({'channels_last (ours)': cl.step, 'NCHW': nchw.step}, rounds)
    _lever_rows(f'R50 training step, batch {batch_size}', times, 'NCHW')
    return times


def lever_threads(batch_size, rounds, cores):
    """Our ViT-B/16 step at 1 thread vs all cores, alternating in one process."""
    arm = build_ours('CLIP_VITB16_CLIP', make_batches(batch_size, 224, 2), **TEXT_B16)

    def at(n):
        def f():
            torch.set_num_threads(n)
            arm.step()
        return f
    fns = {f'{n} thread(s)': at(n) for n in sorted({1, cores})}
    times = _median_times(fns, rounds)
    torch.set_num_threads(cores)
    _lever_rows(f'ViT-B/16 training step, batch {batch_size}', times, '1 thread(s)')
    return times


def lever_compile(batch_size, rounds, mode=None):
    """torch.compile of our ViT-B/16 model (inductor, `mode`: None = default), all-77-token
    captions so the text length is fixed; compile time = first compiled step minus an eager step."""
    batches = make_batches(batch_size, 224, 2, long=True)
    eager = build_ours('CLIP_VITB16_CLIP', batches, 'eager', **TEXT_B16)
    comp = build_ours('CLIP_VITB16_CLIP', batches, 'compiled', compile_like=eager,
                      compile_mode=mode, **TEXT_B16)
    t_eager = eager.step()
    try:
        t_first = comp.step()
    except Exception as e:              # noqa: BLE001  (report, don't crash the benchmark)
        print(f'\ntorch.compile failed on this CPU: {type(e).__name__}: {str(e)[:300]}')
        return None
    print(f'\ntorch.compile (mode {mode or "default"}): first step {t_first:.1f} s (an eager step {t_eager:.1f} s): '
          f'compile time ~{t_first - t_eager:.0f} s')
    times = _median_times({'eager': eager.step, 'torch.compile': comp.step}, rounds)
    _lever_rows(f'ViT-B/16 training step, batch {batch_size}, 77 tokens', times, 'eager')
    return times


def lever_malloc(batch_size, rounds):
    """Our ViT-B/16 step with glibc's default for large blocks (each > 32 MiB allocation a fresh
    mmap, its pages faulted in on first touch) vs utils.keep_freed_memory (main.py's: freed
    blocks up to 1 GiB reused), toggled in one process."""
    arm = build_ours('CLIP_VITB16_CLIP', make_batches(batch_size, 224, 2), **TEXT_B16)

    def with_limit(limit):
        def f():
            utils.keep_freed_memory(limit)
            arm.step()
        return f
    fns = {'glibc default (mmap > 32 MiB)': with_limit(32 << 20), 'keep_freed_memory (ours)': with_limit(1 << 30)}
    times = _median_times(fns, rounds)
    utils.keep_freed_memory()
    _lever_rows(f'ViT-B/16 training step, batch {batch_size}', times, 'glibc default (mmap > 32 MiB)')
    return times


def lever_text_length(batch_size, rounds):
    """Our ViT-B/16 step with the text trimmed to the batch's longest caption (the length
    varies per batch) vs that length rounded up to a multiple of 8 / 16 (fewer distinct
    shapes for the kernels) vs all 77 tokens; exact either way (causal + EOT pooling)."""
    arm = build_ours('CLIP_VITB16_CLIP', make_batches(batch_size, 224, 4), **TEXT_B16)
    exact = models.trimmed_length

    def multiple(m):
        def rounded(eot):               # models.py's trim, rounded up to a multiple of m
            return min(-(-exact(eot) // m) * m, 77)

        def f():
            models.trimmed_length = rounded
            try:
                arm.step()
            finally:
                models.trimmed_length = exact
        return f
    fns = {'exact (longest caption)': multiple(1), 'multiple of 8': multiple(8),
           'multiple of 16': multiple(16), 'all 77 tokens': multiple(77)}
    print(f'\ntrimmed lengths of the pool: {token_stats(arm.batches)[1]}')
    times = _median_times(fns, rounds)
    _lever_rows(f'ViT-B/16 training step, batch {batch_size}, realistic captions', times,
                'exact (longest caption)')
    return times


def lever_overlap(batch_size, rounds, images=None):
    """Data loading overlapped with compute: our CLIP_VITS16_CLIP step fed by main.py's own
    `wds` loader (datasets.build_train_dataset + build_loader, flags parsed by main.py) over
    generated 500x375 JPEG shards at 224 px, with --workers 0 (load, then compute: serial),
    1 and 2 (workers prepare the next batches while the step runs), against the same step on
    batches already in memory (the no-data ceiling). Two passes, the second in reverse order;
    per setting: the median of (wait for the batch + step) and the median wait."""
    sys.path.insert(0, os.path.join(ROOT, 'bench'))
    import data_loader
    steps = max(3, rounds)
    images = images or batch_size * (steps + 2)
    folder = tempfile.mkdtemp(prefix='bench_overlap_')
    shards = data_loader.write_shards(folder, images, per_shard=max(batch_size, images // 4))
    root = os.path.join(folder, f'{{00000..{len(shards) - 1:05d}}}.tar')
    arm = build_ours('CLIP_VITS16_CLIP', [], 'ViT-S/16')
    cached = []

    def loaded(workers):
        args = train_main.parse_args(['--model', 'CLIP_VITS16_CLIP', '--dataset', 'wds', '--root', root,
                                      '--train-num-samples', str(images), '--batch-size',
                                      str(batch_size), '--workers', str(workers),
                                      '--wds-shuffle-buffer', '0', '--output-dir', folder])
        dataset = datasets.build_train_dataset(args, datasets.Tokenizer(77))
        sampler, loader = datasets.build_loader(dataset, args)
        sampler.set_epoch(0, start=0)
        if hasattr(dataset, 'set_epoch'):
            dataset.set_epoch(0)
        it = iter(loader)

        def next_batch():
            batch = next(it)
            batch.pop('_data', None)
            return engine.to_device(batch, DEVICE)
        return next_batch

    def in_memory():
        batches = itertools.cycle(cached)
        return lambda: next(batches)

    def run(source, times, waits):
        next_batch = source()
        for i in range(steps + 1):
            t = time.perf_counter()
            batch = next_batch()
            wait = time.perf_counter() - t
            if len(cached) < 2:
                cached.append(batch)
            arm._step(batch)
            if i:                       # the first batch (worker start-up) is not timed
                times.append(time.perf_counter() - t)
                waits.append(wait)

    print(f'\n## data loading overlapped with compute: CLIP_VITS16_CLIP, batch {batch_size}, '
          f'224 px, wds shards of 500x375 JPEGs, 2 x {steps} timed steps per setting')
    settings = {f'--workers {w}': (lambda w=w: loaded(w)) for w in (0, 1, 2)}
    settings['batches in memory (no loading)'] = in_memory
    got = {name: ([], []) for name in settings}
    run(settings['--workers 0'], [], [])             # fills `cached`, warms the model up
    for name in [*settings, *reversed(settings)]:
        run(settings[name], *got[name])
    print('| setting | step incl. wait, min / median / max (s) | wait for the batch, median (s) | samples/s | vs --workers 0 |')
    print('|---|---|---|---|---|')
    ref = statistics.median(got['--workers 0'][0])
    rows = {}
    for name, (times, waits) in got.items():
        med = statistics.median(times)
        rows[name] = (med, statistics.median(waits))
        print(f'| {name} | {min(times):.2f} / {med:.2f} / {max(times):.2f} | {rows[name][1]:.3f} | '
              f'{batch_size / med:.2f} | {ref / med:.2f}x |')
    return rows


LEVERS = {'optimizer': lambda a: lever_optimizer(a.lever_rounds),
          'guard': lambda a: lever_guard(a.lever_batch, a.lever_rounds),
          'channels_last': lambda a: lever_channels_last(a.lever_batch, a.lever_rounds),
          'threads': lambda a: lever_threads(a.lever_batch, a.lever_rounds, a.threads),
          'compile': lambda a: lever_compile(a.lever_batch, a.lever_rounds, a.compile_mode),
          'malloc': lambda a: lever_malloc(a.lever_batch, a.lever_rounds),
          'text_length': lambda a: lever_text_length(a.lever_batch, a.lever_rounds),
          'overlap': lambda a: lever_overlap(2 * a.lever_batch, 2 * a.lever_rounds)}


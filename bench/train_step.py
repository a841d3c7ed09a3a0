"""Training-step throughput and MFU: our step vs OpenCLIP's, same batch, fp32 on CPU.

    python bench/train_step.py                      # ViT-B/16, R50, CL2L rows + MFU (long on 2 cores)
    python bench/train_step.py --quick              # smoke run: batch 4, 2 timed steps per arm
    python bench/train_step.py --configs vitb16 --batch-size 16 --steps 10

Ours = the real code path: models.create_model + losses.CLIPLoss + main.build_optimizer
(fused AdamW, no decay on 1-d/embeddings) + the body of engine.train_one_epoch
(accumulate_simple, NaN guard, scaler step, zero_grad, model.after_step logit clamp, terms to
floats as the logger does). OpenCLIP = open_clip.create_model(pretrained=None) +
open_clip.loss.ClipLoss + torch.optim.AdamW (its training script's groups and defaults) +
its logit-scale clamp. Both see the same images and token batches; arms are interleaved
step by step (order rotated every round) after warm-up. FLOPs per step are counted once per
arm with torch.utils.flop_counter.FlopCounterMode (matmul/conv/attention ops, forward and
backward; elementwise ops and the optimizer are not counted); the fp32 GEMM peak is the best
of several large torch.mm runs, measured between rounds of the same run.
"""
import argparse
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import datasets  # noqa: E402
import engine  # noqa: E402
import losses  # noqa: E402
import main as train_main  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402

DEVICE = torch.device('cpu')
# OpenCLIP ViT-B-16 / RN50 text tower and embedding: our overrides to match them
TEXT_B16 = dict(embed_dim=512, transformer_width=512, transformer_layers=12,
                transformer_heads=8, context_length=77)
OPT = SimpleNamespace(lr=5e-4, betas=(0.9, 0.98), eps=1e-6, wd=0.1)   # both arms

# ----------------------------------------------------------------------------- inputs

_WORDS = ('a man woman child dog cat bird horse car bus train boat bike street road city '
          'park beach river lake mountain forest field garden house building bridge tower '
          'church table chair bed room kitchen window door wall floor sky cloud sun snow rain '
          'tree flower grass rock sand water wave light night morning evening old young small '
          'large big little red blue green yellow white black brown orange pink purple grey '
          'wooden stone glass metal empty busy quiet beautiful happy smiling running walking '
          'sitting standing playing holding looking riding eating wearing carrying jumping '
          'flying swimming reading near next to in on at with of under over behind front '
          'during after before the and his her their its an two three several group people '
          'players team crowd family friends couple vintage portrait view photo illustration '
          'background close up aerial sunset autumn summer winter spring festival wedding '
          'market restaurant station airport museum stadium concert game match shirt dress '
          'hat jacket shoes bag phone camera book guitar ball flag sign logo poster design').split()


def caption_lengths(n, gen, long=False):
    """Words per caption: log-normal around 9.5 words (CC3M's captions average ~10 words),
    3-40 words; `long`: 80 words, truncated by the tokenizer at 77 tokens (the worst case)."""
    if long:
        return [80] * n
    words = torch.exp(math.log(9.5) + 0.45 * torch.randn(n, generator=gen))
    return [int(w) for w in words.round().clamp(3, 40)]


def token_batch(n, seed, long=False, tokenizer=None):
    """[n, 77] int64 CLIP BPE tokens of random captions (see caption_lengths)."""
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for k in caption_lengths(n, gen, long):
        idx = torch.randint(len(_WORDS), (k,), generator=gen)
        texts.append(' '.join(_WORDS[i] for i in idx))
    return (tokenizer or datasets.Tokenizer(77))(texts)


def make_batches(batch_size, image_size, count, long=False, views=0):
    """`count` different batches (cycled during timing): normalised float images + tokens."""
    tok = datasets.Tokenizer(77)
    out = []
    for s in range(count):
        g = torch.Generator().manual_seed(1000 + s)
        b = {'image': torch.randn(batch_size, 3, image_size, image_size, generator=g),
             'text': token_batch(batch_size, 2000 + s, long, tok)}
        if views:
            b['image_views'] = torch.randn(batch_size, views, 3, image_size, image_size, generator=g)
            b['text_views'] = torch.stack([token_batch(batch_size, 3000 + 10 * s + v, long, tok)
                                           for v in range(views)], 1)              # [B, V, 77]
        out.append(b)
    return out


def token_stats(batches):
    """(mean tokens per caption incl. SOT/EOT, trimmed length per batch = longest caption)."""
    lens = torch.cat([b['text'].argmax(-1) + 1 for b in batches]).float()
    return float(lens.mean()), [int(b['text'].argmax(-1).max()) + 1 for b in batches]


# ----------------------------------------------------------------------------- arms

class Arm:
    """One model + optimizer + step function; collects per-step seconds."""

    def __init__(self, label, step, batches, model, flops_like=None):
        self.label, self._step, self.batches, self.model = label, step, batches, model
        self.times, self.cpu_times, self.flops, self.i = [], [], None, 0
        self.flops_like, self.warmup_s = flops_like, None

    def step(self):
        """One step; returns wall seconds (process CPU seconds go to self.last_cpu)."""
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        c, t = time.process_time(), time.perf_counter()
        self._step(batch)
        self.last_cpu = time.process_time() - c
        return time.perf_counter() - t

    def count_flops(self):
        """Matmul/conv/attention FLOPs of one full step (forward + backward), averaged over
        the batch pool (text length varies per batch for our trimmed text tower). A compiled
        arm (`flops_like`: its eager twin, counted first) takes the twin's count - the same
        math - and its pass over the pool is the compile warm-up (self.warmup_s)."""
        if self.flops_like is not None:
            t = time.perf_counter()
            for _ in range(2 * len(self.batches)):   # every text length, then the dynamic graph
                self.step()
            self.warmup_s, self.flops = time.perf_counter() - t, self.flops_like.flops
            return
        total = 0
        for _ in range(len(self.batches)):
            with FlopCounterMode(display=False) as counter:
                self.step()
            total += counter.get_total_flops()
        self.flops = total / len(self.batches)


def ours_step_fn(model, loss_fn, optimizer, scaler, momentum=0.99, guard=True):
    """The body of engine.train_one_epoch for one optimizer step (update_freq 1, fp32)."""
    def step(batch):
        terms = engine.accumulate_simple(model, loss_fn, [batch], scaler, DEVICE, 'fp32')
        if not guard or engine._grads_finite(terms['loss'], optimizer):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            engine.unwrap(model).after_step(momentum)
        else:
            optimizer.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in terms.items()}        # MetricLogger.update's floats
    return step


def build_ours(name, batches, label=None, checkpoint_grad=False, compile_like=None,
               compile_mode=None, **overrides):
    """`compile_like`: the eager arm this one is the main.py --compile twin of (`compile_mode`:
    another torch.compile mode than main.py's default)."""
    torch.manual_seed(0)
    model = models.create_model(name, **overrides).train()
    if checkpoint_grad:
        model.set_grad_checkpointing(True)
    if name.startswith('CL2L'):
        loss_fn = losses.CL2LLoss(label_smoothing=0.1)
    else:
        loss_fn = losses.CLIPLoss()
    optimizer = train_main.build_optimizer(model, OPT)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    step_model = model
    if compile_like:
        step_model = (train_main.compile_for_training(model) if compile_mode is None
                      else torch.compile(model, mode=compile_mode))
    return Arm(label or f'ours {name}', ours_step_fn(step_model, loss_fn, optimizer, scaler),
               batches, model, compile_like)


def openclip_param_groups(model, wd):
    """OpenCLIP's training/main.py rule: no decay for gains, biases, norms, logit scale."""
    def exclude(n, p):
        return p.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n or 'logit_scale' in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{'params': [p for n, p in named if exclude(n, p)], 'weight_decay': 0.0},
            {'params': [p for n, p in named if not exclude(n, p)], 'weight_decay': wd}]


def register_openclip_timm_r50():
    """open_clip 3.3 ships no `timm-resnet50` config (older releases did): register one with
    the same towers as our R50 (timm resnet50, average pooling, linear projection)."""
    import json
    import tempfile
    import open_clip
    if 'timm-resnet50' in open_clip.list_models():
        return
    cfg = {'embed_dim': 1024,
           'vision_cfg': {'timm_model_name': 'resnet50', 'timm_model_pretrained': False,
                          'timm_pool': 'avg', 'timm_proj': 'linear', 'image_size': 224},
           'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 512, 'heads': 8,
                        'layers': 12}}
    d = tempfile.mkdtemp(prefix='oc_cfg_')
    with open(os.path.join(d, 'timm-resnet50.json'), 'w') as f:
        json.dump(cfg, f)
    open_clip.add_model_config(d)


def build_openclip(name, batches, label=None, optimizer_kwargs=None, compile_like=None, **model_kwargs):
    """`compile_like`: the eager arm this one is the torch.compile twin of (OpenCLIP's training
    script compiles the whole model with --torchcompile, as done here)."""
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, output_dict=True, **model_kwargs).train()
    step_model = torch.compile(model) if compile_like else model
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(openclip_param_groups(model, OPT.wd), lr=OPT.lr, betas=OPT.betas,
                                  eps=OPT.eps, **(optimizer_kwargs or {}))

    def step(batch):                     # open_clip/training/train.py, fp32, accum_freq 1
        optimizer.zero_grad()
        out = step_model(batch['image'], batch['text'])
        loss = loss_fn(out['image_features'], out['text_features'], out['logit_scale'])
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()
    return Arm(label or f'OpenCLIP {name}', step, batches, model, compile_like)


# ----------------------------------------------------------------------------- timing

def gemm_peak(n=4096, reps=4):
    """Best fp32 FLOP/s of an n x n x n torch.mm (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def interleave(arms, steps, warmup=1, peak=None, log=print):
    """Warm up every arm (FLOPs counted there), then `steps` rounds of one step per arm,
    rotating the order each round. `peak`: a list that collects GEMM peaks between rounds."""
    for arm in arms:
        arm.count_flops()
        for _ in range(warmup):
            arm.step()
    for r in range(steps):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for arm in order:
            arm.times.append(arm.step())
            arm.cpu_times.append(arm.last_cpu)
        if peak is not None:
            peak.append(gemm_peak())
        log(f'  round {r + 1}/{steps}: ' + ', '.join(f'{a.label} {a.times[-1]:.2f}s' for a in arms))


def summary(arm, batch_size):
    t = arm.times
    med = statistics.median(t)
    return {'label': arm.label, 'min': min(t), 'median': med, 'max': max(t),
            'samples_per_s': batch_size / med, 'flops': arm.flops,
            'cpu': statistics.median(arm.cpu_times) if arm.cpu_times else float('nan')}


def print_table(rows, batch_size, peak, ref=None):
    """Markdown table; ratio column vs `ref` (a label) in samples/s at the median step."""
    print('| arm | step min / median / max (s) | CPU s/step (median) | samples/s | ms/sample | '
          'GFLOP/step | achieved GFLOP/s | MFU (median / best step) | vs ref: median / best step / CPU |')
    print('|---|---|---|---|---|---|---|---|---|')
    ref_row = next((r for r in rows if r['label'] == ref), None)
    for r in rows:
        fl = r['flops'] or 0
        ratio = (f"{ref_row['median'] / r['median']:.2f}x / {ref_row['min'] / r['min']:.2f}x / "
                 f"{ref_row['cpu'] / r['cpu']:.2f}x" if ref_row else '')
        print(f"| {r['label']} | {r['min']:.2f} / {r['median']:.2f} / {r['max']:.2f} | {r['cpu']:.1f} | "
              f"{r['samples_per_s']:.2f} | {1000 * r['median'] / batch_size:.0f} | {fl / 1e9:.0f} | "
              f"{fl / r['median'] / 1e9:.0f} | {100 * fl / r['median'] / peak:.0f} % / "
              f"{100 * fl / r['min'] / peak:.0f} % | {ratio} |")


def peak_rss_mb():
    """This process's peak resident set size (MB): /proc/self/status VmHWM, the high-water mark
    of this address space. Not getrusage's ru_maxrss, which Linux carries over from the parent
    across fork + exec (a child of a big process would report the parent's peak)."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024            # kB -> MB
    raise RuntimeError('no VmHWM in /proc/self/status (Linux only)')


def machine_note(threads):
    load = os.getloadavg()
    return (f"torch {torch.__version__}, {threads} threads of {os.cpu_count()} cores, "
            f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")


# ----------------------------------------------------------------------------- configs

def run_vitb16(args, peak):
    """Ours CLIP_VITB16_CLIP at OpenCLIP ViT-B-16's dimensions vs OpenCLIP ViT-B-16, on
    realistic captions and on all-77-token captions."""
    import open_clip  # noqa: F401
    real = make_batches(args.batch_size, 224, args.pool)
    full = make_batches(args.batch_size, 224, args.pool, long=True)
    mean_len, trimmed = token_stats(real)
    print(f'\n## ViT-B/16, batch {args.batch_size}, 224 px, fp32; realistic captions: mean '
          f'{mean_len:.1f} tokens, trimmed length per batch {trimmed}; worst case: all 77 tokens')
    arms = [build_ours('CLIP_VITB16_CLIP', real, 'ours ViT-B/16 (captions)', **TEXT_B16),
            build_ours('CLIP_VITB16_CLIP', full, 'ours ViT-B/16 (77 tokens)', **TEXT_B16),
            build_openclip('ViT-B-16', real, 'OpenCLIP ViT-B-16')]
    n_ours = sum(p.numel() for p in arms[0].model.parameters())
    n_oc = sum(p.numel() for p in arms[2].model.parameters())
    print(f'parameters: ours {n_ours / 1e6:.2f} M, OpenCLIP {n_oc / 1e6:.2f} M')
    interleave(arms, args.steps, args.warmup, peak)
    rows = [summary(a, args.batch_size) for a in arms]
    del arms
    return rows


def run_vitb16_compile(args, peak):
    """ViT-B/16 with torch.compile on both sides (ours: main.py --compile; OpenCLIP: its
    --torchcompile, the whole model) and their eager twins, realistic captions. Compile time =
    the compiled arm's warm-up (two passes over the batch pool) minus as many eager steps."""
    import open_clip  # noqa: F401
    real = make_batches(args.batch_size, 224, args.pool)
    print(f'\n## ViT-B/16 + torch.compile, batch {args.batch_size}, 224 px, fp32, realistic '
          f'captions (trimmed lengths {token_stats(real)[1]})')
    ours = build_ours('CLIP_VITB16_CLIP', real, 'ours ViT-B/16 eager', **TEXT_B16)
    oc = build_openclip('ViT-B-16', real, 'OpenCLIP ViT-B-16 eager')
    arms = [ours, build_ours('CLIP_VITB16_CLIP', real, 'ours ViT-B/16 --compile', compile_like=ours,
                             **TEXT_B16),
            oc, build_openclip('ViT-B-16', real, 'OpenCLIP ViT-B-16 compiled', compile_like=oc)]
    interleave(arms, args.steps, args.warmup, peak)
    for a in arms:
        if a.warmup_s is not None:
            eager = statistics.median(a.flops_like.times)
            print(f'compile time, {a.label}: ~{a.warmup_s - 2 * len(a.batches) * eager:.0f} s '
                  f'(warm-up {a.warmup_s:.0f} s over {2 * len(a.batches)} steps, eager step {eager:.1f} s)')
    rows = [summary(a, args.batch_size) for a in arms]
    del arms
    return rows


def run_r50(args, peak):
    register_openclip_timm_r50()
    real = make_batches(args.batch_size, 224, args.pool)
    print(f'\n## ResNet-50, batch {args.batch_size}, 224 px, fp32, realistic captions')
    over = dict(TEXT_B16, embed_dim=1024)
    arms = [build_ours('CLIP_R50_CLIP', real, 'ours R50', **over),
            build_openclip('timm-resnet50', real, 'OpenCLIP timm-resnet50 (registered)'),
            build_openclip('RN50', real, 'OpenCLIP RN50 (ModifiedResNet)')]
    interleave(arms, args.steps, args.warmup, peak)
    return [summary(a, args.batch_size) for a in arms]


def run_cl2l(args, peak):
    views = 2
    real = make_batches(args.batch_size, 224, min(2, args.pool), views=views)
    print(f'\n## CL2L_VITB16_CL2L, batch {args.batch_size}, 1 global + {views} views at 224 px, '
          f'--separate-proj (reference only: no OpenCLIP counterpart)')
    arms = [build_ours('CL2L_VITB16_CL2L', real, 'ours CL2L ViT-B/16 (2 views)', separate_proj=True,
                       **TEXT_B16)]
    interleave(arms, max(2, args.steps // 3), args.warmup, peak)
    return [summary(a, args.batch_size) for a in arms]


CONFIGS = {'vitb16': run_vitb16, 'vitb16_compile': run_vitb16_compile, 'r50': run_r50,
           'cl2l': run_cl2l}


# ----------------------------------------------------------------------------- levers

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
    fns = {'engine._grads_finite': lambda: engine._grads_finite(terms['loss'], opt),
           'torch._foreach_norm guard': foreach_guard,
           'terms to floats': lambda: {k: float(v) for k, v in terms.items()},
           'after_step (logit clamp)': lambda: model.after_step(0.99)}
    times = _median_times(fns, rounds)
    _lever_rows(f'host-side pieces of our step (ViT-B/16, batch {batch_size})', times,
                'engine._grads_finite')
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
    exact = models._trimmed_length

    def multiple(m):
        def rounded(eot):               # models.py's trim, rounded up to a multiple of m
            return min(-(-exact(eot) // m) * m, 77)

        def f():
            models._trimmed_length = rounded
            try:
                arm.step()
            finally:
                models._trimmed_length = exact
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


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--steps', type=int, default=10, help='timed steps per arm (interleaved)')
    p.add_argument('--warmup', type=int, default=0,
                   help='untimed steps per arm after the FLOP-count steps (which warm up already)')
    p.add_argument('--pool', type=int, default=3, help='distinct batches cycled (each FLOP-counted once)')
    p.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument('--quick', action='store_true', help='smoke run: batch 4, 2 steps, pool 2')
    p.add_argument('--levers', nargs='*', choices=list(LEVERS), default=None,
                   help='measure speed levers instead of the configs (no value: all)')
    p.add_argument('--lever-batch', type=int, default=8)
    p.add_argument('--lever-rounds', type=int, default=4)
    p.add_argument('--compile-mode', default=None,
                   help='torch.compile mode of the compile lever (default, reduce-overhead, '
                        'max-autotune-no-cudagraphs, ...)')
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.pool, args.warmup = 4, 2, 2, 0
    torch.set_num_threads(args.threads)
    # compile times as a first run sees them: a fresh inductor cache unless one is given
    os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', tempfile.mkdtemp(prefix='bench_inductor_'))
    utils.keep_freed_memory()       # as main.py does; in this one process it helps OpenCLIP's arm too
    if args.levers is not None:
        if args.quick:
            args.lever_batch, args.lever_rounds = 2, 1
        print(f'# speed levers, fp32 CPU: {machine_note(args.threads)}')
        out = {name: LEVERS[name](args) for name in (args.levers or LEVERS)}
        print(f'\nafter: {machine_note(args.threads)}')
        return out
    print(f'# training step, fp32 CPU: {machine_note(args.threads)}')
    peak = [gemm_peak()]
    results = {}
    for name in args.configs:
        results[name] = CONFIGS[name](args, peak)
    best_peak = max(peak)
    print(f'\nfp32 GEMM peak (4096^3 torch.mm, best of {4 * len(peak)}): {best_peak / 1e9:.0f} GFLOP/s; '
          f'{machine_note(args.threads)}')
    refs = {'vitb16': 'OpenCLIP ViT-B-16', 'vitb16_compile': 'OpenCLIP ViT-B-16 eager',
            'r50': 'OpenCLIP timm-resnet50 (registered)', 'cl2l': None}
    for name, rows in results.items():
        print(f'\n### {name} (batch {args.batch_size})')
        print_table(rows, args.batch_size, best_peak, refs[name])
    if 'vitb16' in results:
        rows = {r['label']: r for r in results['vitb16']}
        oc, real, full = (rows[k] for k in ('OpenCLIP ViT-B-16', 'ours ViT-B/16 (captions)',
                                            'ours ViT-B/16 (77 tokens)'))

        def mfu(r):
            return 100 * r['flops'] / r['median'] / best_peak
        print(f"\nViT-B/16 batch {args.batch_size} samples/s, ours / OpenCLIP (median step): "
              f"{oc['median'] / real['median']:.2f}x with realistic captions "
              f"(best step {oc['min'] / real['min']:.2f}x), {oc['median'] / full['median']:.2f}x with "
              f"all-77-token captions; MFU ours {mfu(real):.0f} %, OpenCLIP {mfu(oc):.0f} %")
    if 'vitb16_compile' in results:
        rows = {r['label']: r for r in results['vitb16_compile']}
        oc, occ, oursc = (rows[k] for k in ('OpenCLIP ViT-B-16 eager', 'OpenCLIP ViT-B-16 compiled',
                                            'ours ViT-B/16 --compile'))
        print(f"\nViT-B/16 batch {args.batch_size} samples/s, ours --compile / OpenCLIP (median step): "
              f"{oc['median'] / oursc['median']:.2f}x vs OpenCLIP eager, "
              f"{occ['median'] / oursc['median']:.2f}x vs OpenCLIP compiled")
    return results


if __name__ == '__main__':
    main()

"""The arms of bench/train_step.py (and bench/memory.py, bench/scaling.py): input batches,
our real training step and OpenCLIP's, timing and table helpers. See train_step.py."""
import math
import os
import statistics
import sys
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


def ours_step_fn(model, loss_fn, optimizer, scaler):
    """engine.train_step as engine.train_one_epoch runs it (update_freq 1, fp32), then the
    terms to floats as its MetricLogger does."""
    def step(batch):
        terms, _ = engine.train_step(model, loss_fn, [batch], optimizer, scaler, DEVICE, 'fp32')
        return {k: float(v) for k, v in terms.items()}
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


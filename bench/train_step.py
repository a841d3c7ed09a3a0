"""Training-step throughput and MFU: our step vs OpenCLIP's, same batch, fp32 on CPU.

    python bench/train_step.py                      # ViT-B/16, R50, RN50OAI, CL2L rows + MFU (long on 2 cores)
    python bench/train_step.py --quick              # smoke run: batch 4, 2 timed steps per arm
    python bench/train_step.py --configs vitb16 --batch-size 16 --steps 10

Ours = the real code path: models.create_model + losses.CLIPLoss + main.build_optimizer
(fused AdamW, no decay on 1-d/embeddings) + engine.train_step, main.py's step (forward,
backward, NaN guard, scaler step, zero_grad, model.after_step logit clamp; terms to floats as
the logger does). OpenCLIP = open_clip.create_model(pretrained=None) +
open_clip.loss.ClipLoss + torch.optim.AdamW (its training script's groups and defaults) +
its logit-scale clamp. Both see the same images and token batches; arms are interleaved
step by step (order rotated every round) after warm-up. FLOPs per step are counted once per
arm with torch.utils.flop_counter.FlopCounterMode (matmul/conv/attention ops, forward and
backward; elementwise ops and the optimizer are not counted); the fp32 GEMM peak is the best
of several large torch.mm runs, measured between rounds of the same run.
"""
import argparse
import os
import statistics
import tempfile

import torch

from step_arms import (TEXT_B16, build_openclip, build_ours, gemm_peak, interleave, machine_note,
                       make_batches, print_table, register_openclip_timm_r50, summary, token_stats)
from step_levers import LEVERS
import utils  # noqa: E402  (step_arms put the repository on sys.path)

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


def run_rn50oai(args, peak):
    """Ours CLIP_RN50OAI_CLIP (timm's resnet50_clip: OpenAI's ModifiedResNet, its attention pool's
    c_proj as our image projection) vs OpenCLIP RN50 (its own ModifiedResNet), same batch."""
    real = make_batches(args.batch_size, 224, args.pool)
    print(f'\n## OpenAI RN50 (ModifiedResNet), batch {args.batch_size}, 224 px, fp32, realistic captions')
    arms = [build_ours('CLIP_RN50OAI_CLIP', real, 'ours RN50OAI', **dict(TEXT_B16, embed_dim=1024)),
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
           'rn50oai': run_rn50oai, 'cl2l': run_cl2l}


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
            'r50': 'OpenCLIP timm-resnet50 (registered)', 'rn50oai': 'OpenCLIP RN50 (ModifiedResNet)',
            'cl2l': None}
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

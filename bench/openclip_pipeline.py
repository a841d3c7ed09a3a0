"""Data-loading throughput: our `wds` training loader against OpenCLIP's own webdataset training
pipeline, on the same shards, batch size, workers and cores, in one run (interleaved rounds).

    python bench/openclip_pipeline.py [--images 4000] [--sizes 224 112 84] [--workers 2] [--rounds 5]
    python bench/openclip_pipeline.py --quick     # smoke run: 320 images, 224 + 84 px, 1 round

The shards hold images as an img2dataset download keeps them (loader_common.download_like:
sides 256-640 px, 85 % JPEG q75-95, 10 % PNG, 5 % WebP) with captions. The two arms:
  openclip: open_clip_train.data.get_wds_dataset(args, preprocess_train, is_train=True,
            tokenizer=...) exactly as open_clip_train's main builds it for
            `--dataset-type webdataset` (shard + sample shuffle, decode('pilrgb'), its
            WebLoader), with preprocess_train from open_clip.create_model_and_transforms
            (`--model`, `--force-image-size SIZE` for CLIPA's 112/84 px; RandomResizedCrop
            scale 0.9-1, bicubic, ToTensor, Normalize) and open_clip.get_tokenizer;
  ours:     datasets.py's `wds` reader with the training decode options and SampleBuilder,
            at the same crop scale (`--our-min-scale`, default OpenCLIP's 0.9: the same work),
            the consuming loop normalising each uint8 batch as train_one_epoch does.
Prints, per image size, images/s and CPU ms per image (consuming process + its workers; from
each worker's second batch on) as min / median / max over the rounds and the ratios of the
medians; then an in-process profile of each side's per-image stages (decode, crop/resize,
to-tensor/normalise, tokenise) beside the whole loader's CPU ms per image, and the cost of the
JPEG decode options (what the 224 px time is made of, the levers tried).
"""
import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]        # the repository, and loader_common

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import datasets  # noqa: E402
import utils  # noqa: E402
from loader_common import (consume_ours, existing_shards, images_per_s, ours, spread,  # noqa: E402
                           write_shards)
from loader_profile import (print_decode_levers, print_stages, profile_ours, profile_pil_pipeline,  # noqa: E402
                            read_samples)


# ----------------------------------------------------------------------------- the OpenCLIP arm

def openclip_parts(model_name, size):
    """(preprocess_train, tokenizer) as open_clip_train's main makes them (--force-image-size).
    The model is built on the meta device: no weights are allocated, so the loader workers do
    not fork from a process holding a freed ViT's heap (whose copy-on-write pages they would
    pay for)."""
    import open_clip
    with torch.device('meta'):
        _, preprocess_train, _ = open_clip.create_model_and_transforms(
            model_name, pretrained=None, force_image_size=size, device='meta')
    return preprocess_train, open_clip.get_tokenizer(model_name)


def openclip_loader(shards, n, batch, workers, preprocess_train, tokenizer, seed=0):
    """open_clip_train.data.get_wds_dataset for --dataset-type webdataset --train-data
    'a.tar::b.tar' --train-num-samples n: its DataLoader (a wds.WebLoader)."""
    from open_clip_train import data     # needs pandas (requirements.txt)
    _as_webdataset_0_2(data)
    args = SimpleNamespace(train_data='::'.join(shards['wds']), val_data=None, train_num_samples=n,
                           dataset_resampled=False, train_data_upsampling_factors=None, seed=seed,
                           batch_size=batch, workers=workers, world_size=1)
    return data.get_wds_dataset(args, preprocess_train, is_train=True, epoch=0, tokenizer=tokenizer).dataloader


def _as_webdataset_0_2(data):
    """open_clip_train requires webdataset <= 0.2.86 (its `training` extra); we pin 1.0.2, whose
    tar_file_expander ends every shard with an end-of-shard marker `{}` that open_clip_train's
    group_by_keys_nothrow does not expect (KeyError: 'fname'). Without the marker, as in 0.2.86;
    the work per sample is unchanged."""
    from webdataset.tariterators import tar_file_expander
    data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


# ----------------------------------------------------------------------------- throughput

def throughput(shards, n, sizes, a, tokenizer):
    """-> {size: {arm: [(images/s, CPU ms/image) per round]}}, arms interleaved round by round."""
    warmup = max(1, a.workers)                          # each worker's first batch is not timed
    limit = n - a.batch_size * (warmup + a.workers + 1)   # leave room: workers may stop early
    results = {}
    for size in sizes:
        preprocess, oc_tokenizer = openclip_parts(a.model, size)
        arms = {'ours': (lambda: ours(shards, n, size, a.batch_size, a.workers, tokenizer,
                                      min_scale=a.our_min_scale, shuffle_buffer=1000), consume_ours),
                'openclip': (lambda: openclip_loader(shards, n, a.batch_size, a.workers, preprocess,
                                                     oc_tokenizer), lambda batch: batch[0])}
        results[size] = {arm: [] for arm in arms}
        for _ in range(a.rounds):
            for arm, (make, consume) in arms.items():
                loader = make()
                results[size][arm].append(images_per_s(loader, limit, consume, warmup))
                del loader
    return results


def print_throughput(results):
    print("| image size | ours (images/s) | OpenCLIP (images/s) | ratio of medians "
          "| ours (CPU ms/image) | OpenCLIP (CPU ms/image) | images per CPU-second ratio |")
    print("|---|---|---|---|---|---|---|")
    for size, arms in results.items():
        speed = {k: [s for s, _ in v] for k, v in arms.items()}
        cpu = {k: [c for _, c in v if c is not None] for k, v in arms.items()}
        cpu_cols = "- | - | -"                          # no /proc: no CPU times
        if cpu['ours'] and cpu['openclip']:
            cpu_cols = (f"{spread(cpu['ours'], '{:.2f}')} | {spread(cpu['openclip'], '{:.2f}')} | "
                        f"{statistics.median(cpu['openclip']) / statistics.median(cpu['ours']):.2f}x")
        print(f"| {size} | {spread(speed['ours'])} | {spread(speed['openclip'])} | "
              f"{statistics.median(speed['ours']) / statistics.median(speed['openclip']):.2f}x | {cpu_cols} |",
              flush=True)


# ----------------------------------------------------------------------------- per-stage profile

def print_profile(samples, size, a, tokenizer, measured, rounds=3):
    """Per-image ms of each stage of both sides (one thread, in process), and the loaders'
    measured CPU ms per image (`measured`: throughput()'s rounds at this size) beside them:
    the difference is what runs outside these stages (tar reading, shuffling, batching,
    passing batches between processes, Python per sample)."""
    preprocess, oc_tokenizer = openclip_parts(a.model, size)
    loader_ms = {}
    for arm, name in (('ours', 'ours'), ('openclip', 'OpenCLIP')):
        cpu = [c for _, c in measured[arm] if c is not None]
        if cpu:
            loader_ms[name] = statistics.median(cpu)
    print_stages(f"{size} px", samples, rounds, {
        'ours': lambda: profile_ours(samples, size, a.our_min_scale, tokenizer, a.batch_size),
        'OpenCLIP': lambda: profile_pil_pipeline(samples, preprocess, oc_tokenizer, a.batch_size)},
        loader_ms=loader_ms)


# ----------------------------------------------------------------------------- main

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=4000, help='images generated (img2dataset-like mix)')
    p.add_argument('--sizes', type=int, nargs='+', default=[224, 112, 84], help='training resolutions')
    p.add_argument('--workers', type=int, default=2, help='DataLoader workers of both pipelines')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--rounds', type=int, default=5, help='interleaved rounds (min / median / max)')
    p.add_argument('--model', default='ViT-B-16', help="OpenCLIP model whose training preprocess is used")
    p.add_argument('--our-min-scale', type=float, default=0.9,
                   help="our crop's --weak-min-scale (default OpenCLIP's 0.9: the same work; ours trains at 0.5)")
    p.add_argument('--profile-images', type=int, default=500, help='images in the per-stage profile')
    p.add_argument('--data-dir', default=None, help='reuse/keep the shards here (default: a temp dir)')
    p.add_argument('--quick', action='store_true',
                   help='smoke run: 320 images, 224 and 84 px, batch 32, 1 round, 64 profiled')
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.sizes, a.batch_size, a.rounds, a.profile_images = 320, [224, 84], 32, 1, 64
    if min(a.batch_size, a.rounds, *a.sizes) < 1 or a.workers < 0:
        p.error('--batch-size, --rounds and --sizes must be >= 1, --workers >= 0')
    least = a.batch_size * (max(1, a.workers) + a.workers + 2)     # timed batches after the warm-up ones
    if a.images < least:
        p.error(f'--images must be >= --batch-size x (2 x --workers + 2) = {least}')
    return a


def main(argv=None):
    a = get_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # the consuming loop, as the workers (a caller's setting is restored)
    utils.keep_freed_memory()            # as main.py does: the consuming loop's batches reuse memory
    try:
        return run(a)
    finally:
        torch.set_num_threads(threads)


def run(a):
    tokenizer = datasets.Tokenizer()
    per_shard = max(1, min(250, a.images // (2 * max(1, a.workers))))   # >= 2 shards per worker
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.data_dir or tmp
        os.makedirs(folder, exist_ok=True)
        shards = existing_shards(folder)
        if len(shards['wds']) * per_shard < a.images:
            t0 = time.time()
            shards = write_shards(folder, a.images, per_shard, realistic=True)
            print(f"wrote {a.images} img2dataset-like images into {len(shards['wds'])} tar shards "
                  f"in {time.time() - t0:.0f} s")
        print(f"{os.cpu_count()} CPUs, {a.workers} workers, batch {a.batch_size}, {a.rounds} rounds; "
              f"OpenCLIP preprocess of {a.model}, our crop scale {a.our_min_scale}-1; "
              f"torch {torch.__version__}, PIL {Image.__version__}")
        results = throughput(shards, a.images, a.sizes, a, tokenizer)
        print_throughput(results)
        samples = read_samples(shards, a.profile_images)
        for size in a.sizes:
            print_profile(samples, size, a, tokenizer, results[size], rounds=1 if a.quick else 3)
        print_decode_levers(samples, rounds=1 if a.quick else 3)
    return results


if __name__ == '__main__':
    main()

"""Data-loading throughput: our training pipeline against a naive one, same shards, same
DataLoader settings, same cores, in one run (interleaved rounds, best round of each).

    python bench/data_loader.py [--images 2000] [--sizes 64 128 224] [--workers 2] [--rounds 5]
    python bench/data_loader.py --quick        # smoke run: 300 images, 64 px, 1 round

Generates `--images` 500x375 JPEGs (photo-like: gradients, shapes, noise; quality 90) into
WebDataset tar shards with captions, and the same samples into TFRecord shards as img2dataset
writes them (tf.train.Example: key, jpg, txt), then measures images/s of
  ours:  datasets' `wds` reader (streaming.StreamReader) with the training decode options:
         reduced-scale JPEG decode when every crop allows it (decode.draft_policy), else
         torchvision's decode_jpeg straight to a uint8 tensor; augment.SampleBuilder
         (RandomResizedCrop scale 0.5-1, bicubic, uint8 out, tokenise), skip accounting,
         batched in the workers; the consuming loop normalises each batch as training does
         (engine.to_device); row `tfrecord`: the same, reading the TFRecord shards
         (`--dataset tfrecord`: tfrecord.py's framing, CRC-32C checks and Example parsing);
  naive: webdataset .decode('pil') (full decode) + torchvision RandomResizedCrop(scale 0.5-1,
         bicubic) + ToTensor + Normalize + tokenise, collated by the DataLoader;
and prints, for each training resolution and shard format, images/s of ours and of the naive
wds pipeline and their ratio (the best round of each), and the CPU time per image of the
consuming process and its workers (the least of the rounds; steady state, worker start-up
excluded), which other jobs on the machine disturb less; then where the time goes: both
pipelines' per-image stages (decode, crop/resize, to-tensor/normalise, tokenise; in process,
one thread) and what each JPEG decode option costs (bench/loader_profile.py).
"""
import argparse
from functools import partial
import os
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]        # the repository, and loader_common

import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

import augment  # noqa: E402
import datasets  # noqa: E402
import utils  # noqa: E402
from loader_common import consume_ours, existing_shards, images_per_s, ours, write_shards  # noqa: E402
from loader_profile import (print_decode_levers, print_stages, profile_ours, profile_pil_pipeline,  # noqa: E402
                            read_samples)


def naive_transform(size):
    return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.ToTensor(), T.Normalize(augment.CLIP_MEAN, augment.CLIP_STD)])


def naive(shards, n, size, batch, workers, tokenizer):
    transform = naive_transform(size)
    pipeline = (wds.WebDataset(shards['wds'], shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
                .decode('pil').to_tuple('jpg', 'txt')
                .map_tuple(lambda im: transform(im.convert('RGB')), lambda t: tokenizer([t])[0]))
    return torch.utils.data.DataLoader(pipeline, batch_size=batch, num_workers=workers)


CONSUME = {'ours': consume_ours, 'tfrecord': consume_ours,
           'naive': lambda batch: batch[0]}                            # naive: float32 from the workers
PIPELINES = {'ours': ours, 'tfrecord': partial(ours, shard_format='tfrecord'), 'naive': naive}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=2000, help='JPEGs generated (500x375)')
    p.add_argument('--sizes', type=int, nargs='+', default=[64, 128, 224], help='training resolutions')
    p.add_argument('--workers', type=int, default=2, help='DataLoader workers for both pipelines')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--rounds', type=int, default=5,
                   help='interleaved rounds; the best of each is kept (5: the machine is shared)')
    p.add_argument('--data-dir', default=None, help='reuse/keep the shards here (default: a temp dir)')
    p.add_argument('--profile-images', type=int, default=500,
                   help='images in the per-stage profile of both pipelines and the decode table (0: none)')
    p.add_argument('--quick', action='store_true', help='smoke run: 300 images, 64 px, batch 32, 1 round, 64 profiled')
    a = p.parse_args()
    if a.quick:
        a.images, a.sizes, a.batch_size, a.rounds, a.profile_images = 300, [64], 32, 1, 64
    torch.set_num_threads(1)
    utils.keep_freed_memory()            # as main.py does: the consuming loop's batches reuse memory
    tokenizer = datasets.Tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.data_dir or tmp
        os.makedirs(folder, exist_ok=True)
        shards = existing_shards(folder)
        if min(len(s) for s in shards.values()) * 250 < a.images:
            t0 = time.time()
            shards = write_shards(folder, a.images)
            print(f"wrote {a.images} 500x375 JPEGs into {len(shards['wds'])} tar and as many tfrecord "
                  f"shards in {time.time() - t0:.0f} s")
        n = a.images - a.batch_size * (a.workers + 1)       # leave room: workers may stop early
        print(f"{os.cpu_count()} CPUs, {a.workers} workers, batch {a.batch_size}, {a.rounds} rounds; "
              f"torch {torch.__version__}, PIL {Image.__version__}")
        print("| image size | shards | ours (images/s) | naive wds (images/s) | ratio "
              "| ours (CPU ms/image) | naive wds (CPU ms/image) | CPU ratio |")
        print("|---|---|---|---|---|---|---|---|")
        loader_ms = {}
        for size in a.sizes:
            best = dict.fromkeys(PIPELINES, 0.0)
            cpu = loader_ms[size] = dict.fromkeys(PIPELINES, float('inf'))
            for _ in range(a.rounds):
                for name, make in PIPELINES.items():
                    loader = make(shards, a.images, size, a.batch_size, a.workers, tokenizer)
                    speed, ms = images_per_s(loader, n, CONSUME[name])
                    best[name], cpu[name] = max(best[name], speed), min(cpu[name], ms or float('inf'))
                    del loader
            for row, name in (('wds', 'ours'), ('tfrecord', 'tfrecord')):
                cpu_cols = (f"{cpu[name]:.2f} | {cpu['naive']:.2f} | {cpu['naive'] / cpu[name]:.2f}x"
                            if cpu[name] < float('inf') else "- | - | -")      # no /proc: no CPU times
                print(f"| {size} | {row} | {best[name]:.0f} | {best['naive']:.0f} | "
                      f"{best[name] / best['naive']:.2f}x | {cpu_cols} |", flush=True)
        if a.profile_images:
            print_where_time_goes(shards, a, tokenizer, loader_ms)


def print_where_time_goes(shards, a, tokenizer, loader_ms):
    """Per-stage ms of both pipelines at each size (beside the loaders' measured CPU ms per
    image, `loader_ms` {size: {pipeline: ms}}), and what the JPEG decode options cost."""
    samples, rounds = read_samples(shards, a.profile_images), 1 if a.quick else 3
    for size in a.sizes:
        transform = naive_transform(size)
        print_stages(f"{size} px", samples, rounds, {
            'ours': lambda: profile_ours(samples, size, 0.5, tokenizer, a.batch_size),
            'naive': lambda: profile_pil_pipeline(samples, transform, lambda t: tokenizer([t]), a.batch_size)},
            loader_ms={k: v for k, v in loader_ms[size].items() if k != 'tfrecord' and v < float('inf')})
    print_decode_levers(samples, rounds)


if __name__ == '__main__':
    main()

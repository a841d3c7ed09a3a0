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
excluded), which other jobs on the machine disturb less.
"""
import argparse
import io
from functools import partial
import os
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torchvision import transforms as T  # noqa: E402

import augment  # noqa: E402
import datasets  # noqa: E402
import engine  # noqa: E402
import streaming  # noqa: E402
import tfrecord  # noqa: E402
import utils  # noqa: E402
from decode import DecodeOptions, draft_policy  # noqa: E402


def photo(seed, w=500, h=375):
    """A photo-like JPEG: smooth gradients, a few shapes, sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * rng.uniform(80, 255), y / h * rng.uniform(80, 255),
                     np.full_like(x, rng.uniform(0, 255))], -1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 60), rng.integers(0, h - 60)
        box = [int(x0), int(y0), int(x0 + rng.integers(30, 200)), int(y0 + rng.integers(30, 150))]
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    image.save(buf, 'JPEG', quality=90)
    return buf.getvalue()


def write_shards(folder, n, per_shard=250):
    """{'wds': tar shards, 'tfrecord': TFRecord shards} of the same n samples."""
    shards = {'wds': [], 'tfrecord': []}
    for s in range(-(-n // per_shard)):
        path = os.path.join(folder, f'{s:05d}.tar')
        with tarfile.open(path, 'w') as tar, open(os.path.join(folder, f'{s:05d}.tfrecord'), 'wb') as tfr:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                image, text = photo(i), f'a photo number {i}'.encode()
                for name, data in ((f'{i:09d}.jpg', image), (f'{i:09d}.txt', text)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                tfr.write(tfrecord.frame(tfrecord.encode_example({'key': f'{i:09d}', 'jpg': image, 'txt': text})))
        shards['wds'].append(path)
        shards['tfrecord'].append(tfr.name)
    return shards


def existing_shards(folder):
    return {fmt: sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(ext))
            for fmt, ext in (('wds', '.tar'), ('tfrecord', '.tfrecord'))}


def ours(shards, n, size, batch, workers, tokenizer, shard_format='wds'):
    args = argparse.Namespace(image_size=size, base='CLIP', weak_min_scale=0.5)
    builder = augment.SampleBuilder.from_args(args, tokenizer)
    reader = streaming.StreamReader(shard_format, '', shards[shard_format], n, batch, builder,
                                    DecodeOptions(draft=draft_policy(builder), fast_jpeg=True),
                                    shuffle_buffer=0, shard_reader=SHARD_READERS[shard_format])
    reader.set_position(0, 0)
    return torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers,
                                       persistent_workers=False)


SHARD_READERS = {'wds': streaming.tar_samples, 'tfrecord': tfrecord.shard_samples}


def naive(shards, n, size, batch, workers, tokenizer):
    transform = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                           T.ToTensor(), T.Normalize(augment.CLIP_MEAN, augment.CLIP_STD)])
    pipeline = (wds.WebDataset(shards['wds'], shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
                .decode('pil').to_tuple('jpg', 'txt')
                .map_tuple(lambda im: transform(im.convert('RGB')), lambda t: tokenizer([t])[0]))
    return torch.utils.data.DataLoader(pipeline, batch_size=batch, num_workers=workers)


def _cpu_seconds(pids):
    """User + system CPU time of these processes (Linux /proc; None elsewhere)."""
    try:
        total = 0
        for pid in pids:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
            total += int(fields[11]) + int(fields[12])           # utime, stime in clock ticks
        return total / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError):
        return None


def images_per_s(loader, limit, consume):
    """-> (images/s, CPU ms per image of the loop and its workers). `consume(batch)` -> the
    float32 images training would see. CPU time is less sensitive than wall time to other
    jobs on a shared machine (it still grows under contention: shared caches)."""
    seen, t0, it = 0, None, iter(loader)
    pids = [os.getpid()] + [w.pid for w in getattr(it, '_workers', [])]
    for batch in it:
        images = consume(batch)
        if t0 is None:                  # the first batch includes worker start-up: not timed
            t0, cpu0 = time.perf_counter(), _cpu_seconds(pids)
            continue
        seen += images.shape[0]
        if seen >= limit:
            break
    wall, cpu1 = time.perf_counter() - t0, _cpu_seconds(pids)
    return seen / wall, (None if cpu0 is None or cpu1 is None else 1e3 * (cpu1 - cpu0) / seen)


def consume_ours(batch):
    """As train_one_epoch: the skip counts popped, the batch moved and normalised."""
    batch.pop('_data', None)
    return engine.to_device(batch, torch.device('cpu'))['image']        # uint8 -> float32


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
    p.add_argument('--quick', action='store_true', help='smoke run: 300 images, 64 px, batch 32, 1 round')
    a = p.parse_args()
    if a.quick:
        a.images, a.sizes, a.batch_size, a.rounds = 300, [64], 32, 1
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
        for size in a.sizes:
            best = dict.fromkeys(PIPELINES, 0.0)
            cpu = dict.fromkeys(PIPELINES, float('inf'))
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


if __name__ == '__main__':
    main()

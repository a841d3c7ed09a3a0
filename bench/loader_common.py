"""What the data-loading benchmarks share: generated shards (uniform 500x375 JPEGs, or a mix of
sizes, qualities and formats like an img2dataset download), our training loader, and the
timing helpers (images/s, CPU ms per image of the consuming process and its workers).

    from loader_common import write_shards, ours, images_per_s, consume_ours
"""
import argparse
import io
import os
import statistics
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import augment  # noqa: E402
import engine  # noqa: E402
import streaming  # noqa: E402
import tfrecord  # noqa: E402
from decode import DecodeOptions, draft_policy  # noqa: E402

SHARD_READERS = {'wds': streaming.tar_samples, 'tfrecord': tfrecord.shard_samples}


# ----------------------------------------------------------------------------- images

def _picture(rng, w, h):
    """Photo-like pixels: smooth gradients, a few shapes, sensor-like noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * rng.uniform(80, 255), y / h * rng.uniform(80, 255),
                     np.full_like(x, rng.uniform(0, 255))], -1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 60), rng.integers(0, h - 60)
        box = [int(x0), int(y0), int(x0 + rng.integers(30, 200)), int(y0 + rng.integers(30, 150))]
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


def photo(seed, w=500, h=375):
    """A photo-like 500x375 JPEG, quality 90 (the naive-baseline benchmark's images)."""
    buf = io.BytesIO()
    _picture(np.random.default_rng(seed), w, h).save(buf, 'JPEG', quality=90)
    return buf.getvalue()


def download_like(seed):
    """-> (extension, bytes) as an img2dataset download keeps them: sides 256-640 px (random
    aspect), 85 % JPEG at quality 75-95, 10 % PNG, 5 % WebP."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(256, 641, 2))
    image, buf, kind = _picture(rng, w, h), io.BytesIO(), rng.random()
    if kind < 0.85:
        image.save(buf, 'JPEG', quality=int(rng.integers(75, 96)))
        return 'jpg', buf.getvalue()
    if kind < 0.95:
        image.save(buf, 'PNG', compress_level=6)
        return 'png', buf.getvalue()
    image.save(buf, 'WEBP', quality=80)
    return 'webp', buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, n, per_shard=250, realistic=False):
    """{'wds': tar shards, 'tfrecord': TFRecord shards} of the same n samples: 500x375 JPEGs,
    or `realistic` download_like images (tar shards only: TFRecord rows hold JPEGs)."""
    shards = {'wds': [], 'tfrecord': []}
    for s in range(-(-n // per_shard)):
        path = os.path.join(folder, f'{s:05d}.tar')
        tfr = None if realistic else open(os.path.join(folder, f'{s:05d}.tfrecord'), 'wb')
        with tarfile.open(path, 'w') as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                ext, image = download_like(i) if realistic else ('jpg', photo(i))
                text = f'a photo number {i}'.encode()
                _add(tar, f'{i:09d}.{ext}', image)
                _add(tar, f'{i:09d}.txt', text)
                if tfr is not None:
                    tfr.write(tfrecord.frame(tfrecord.encode_example({'key': f'{i:09d}', 'jpg': image, 'txt': text})))
        shards['wds'].append(path)
        if tfr is not None:
            tfr.close()
            shards['tfrecord'].append(tfr.name)
    return shards


def existing_shards(folder):
    return {fmt: sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(ext))
            for fmt, ext in (('wds', '.tar'), ('tfrecord', '.tfrecord'))}


# ----------------------------------------------------------------------------- our loader

def ours(shards, n, size, batch, workers, tokenizer, shard_format='wds', min_scale=0.5, shuffle_buffer=0):
    """Our training loader as datasets.py builds it for --dataset wds (or tfrecord)."""
    args = argparse.Namespace(image_size=size, base='CLIP', weak_min_scale=min_scale)
    builder = augment.SampleBuilder.from_args(args, tokenizer)
    reader = streaming.StreamReader(shard_format, '', shards[shard_format], n, batch, builder,
                                    DecodeOptions(draft=draft_policy(builder), fast_jpeg=True),
                                    shuffle_buffer=shuffle_buffer, shard_reader=SHARD_READERS[shard_format])
    reader.set_position(0, 0)
    return torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers,
                                       persistent_workers=False)


def consume_ours(batch):
    """As train_one_epoch: the skip counts popped, the batch moved and normalised."""
    batch.pop('_data', None)
    return engine.to_device(batch, torch.device('cpu'))['image']        # uint8 -> float32


# ----------------------------------------------------------------------------- timing

def cpu_seconds(pids):
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


def child_pids():
    """This process's live children (the DataLoader workers, whoever wraps the DataLoader)."""
    pids = []
    try:
        for task in os.listdir('/proc/self/task'):
            with open(f'/proc/self/task/{task}/children') as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        return []
    return pids


def images_per_s(loader, limit, consume, warmup=1):
    """-> (images/s, CPU ms per image of the loop and its workers). `consume(batch)` -> the
    float32 images training would see. The first `warmup` batches are not timed: worker
    start-up, shuffle-buffer fill (`warmup` = the number of workers leaves out each worker's
    first batch; data_loader.py keeps 1, as its recorded history). CPU time is less sensitive
    than wall time to other jobs on a shared machine (it still grows under contention: shared
    caches)."""
    seen, done, t0, it = 0, 0, None, iter(loader)
    for batch in it:
        images = consume(batch)
        done += 1
        if done <= warmup:
            if done == warmup:
                pids = {os.getpid(), *child_pids(), *(w.pid for w in getattr(it, '_workers', []))}   # workers
                # exist by now (a wds.WebLoader starts them at the first batch, a DataLoader at iter())
                t0, cpu0 = time.perf_counter(), cpu_seconds(pids)
            continue
        seen += images.shape[0]
        if seen >= limit:
            break
    wall, cpu1 = time.perf_counter() - t0, cpu_seconds(pids)
    return seen / wall, (None if cpu0 is None or cpu1 is None else 1e3 * (cpu1 - cpu0) / seen)


def spread(values, fmt='{:.0f}'):
    """'min / median / max' of a list of numbers (the median the ratios use)."""
    return ' / '.join(fmt.format(x) for x in (min(values), statistics.median(values), max(values)))


class Clock:
    """Wall and process CPU seconds per phase, summed over its entries: `with clock('decode'): ...`
    (process CPU time: other jobs on the machine stretch wall time, much less CPU time)."""

    def __init__(self):
        self.phases = {}

    def __call__(self, phase):
        self._phase = phase
        return self

    def __enter__(self):
        self._t0 = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc):
        wall, cpu = self.phases.get(self._phase, (0.0, 0.0))
        self.phases[self._phase] = (wall + time.perf_counter() - self._t0[0],
                                    cpu + time.process_time() - self._t0[1])

    def cpu(self, phase):
        return self.phases.get(phase, (0.0, 0.0))[1]

"""Streaming readers over tar archives: `wds` (WebDataset shards as img2dataset writes them:
KEY.jpg/.png/.webp + KEY.txt [+ KEY.json]) and `tarpairs` (RangeAugment's .tar.gz archives of
ID_image / ID_text members, listed by a metadata dict {'0-1000': '00000000_0_1000.tar.gz'}).

Order and resume (shard-exact): each epoch the shard list is permuted by (seed, epoch) and
split across ranks and then across the DataLoader workers (or, with fewer shards than
workers x ranks, every stream reads all shards and keeps every k-th sample); each stream
shuffles samples through a seeded buffer. An epoch is `--train-num-samples` samples
(streams wrap into a fresh permutation when the data runs out; `--wds-resampled` draws
shards with replacement instead). Every batch is exactly `batch_size` consecutive stream
samples: an unusable one is replaced by another sample of the same batch re-augmented with
its own seed, so the stream position of batch b never depends on decoding, and a run
resumed at batch b fast-forwards its streams over b x batch_size samples without decoding
them. The order is a function of (seed, epoch, rank, world size, --workers): resume with the
same --workers. (Only a batch whose samples are *all* unusable reads extra samples.)
"""
import glob
import itertools
import json
import multiprocessing as mp
import os
import random
import re
import zlib

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from decode import Skip, clean_captions, decode_image
from metadata import DataError
from readers import PRINT_FIRST, PROBE, collate, mix_seed, mix_seeds

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'image')
TEXT_EXTS = ('txt', 'text')
WDS_LAYOUT = ("--root 'shards/{00000..01023}.tar' (brace pattern, '::'-separated lists, or a "
              "folder of .tar) with members KEY.jpg/.png/.webp and KEY.txt")
TARPAIRS_LAYOUT = ("--root DIR holding the .tar.gz archives (members ID_image, ID_text) and --metadata "
                   "a JSON dict {'0-1000': '00000000_0_1000.tar.gz', ...} (id range -> archive)")


class StreamReader(IterableDataset):
    """Yields whole collated batches (use DataLoader(batch_size=None)); see the module doc."""

    def __init__(self, name, layout, shards, num_samples, batch_size, builder, opts, seed=0,
                 rank=0, world=1, resampled=False, shuffle_buffer=1000, rename=None):
        self.name, self.layout, self.shards = name, layout, list(shards)
        self.batch_size, self.builder, self.opts, self.seed = batch_size, builder, opts, seed
        self.rank, self.world, self.resampled = rank, world, resampled
        self.shuffle_buffer, self.rename = shuffle_buffer, rename
        self.num_batches = num_samples // (world * batch_size)
        self.shared = mp.RawArray('q', 2)          # (epoch, start) seen by persistent workers
        self._pending, self._printed = [], 0

    # -- driven by datasets.StreamControl (the sampler main.py sees)
    def set_position(self, epoch, start=0):
        """The next iteration yields `epoch` from sample `start` (of this rank) on."""
        self.shared[0], self.shared[1] = epoch, start

    def __len__(self):
        return self.num_batches

    # -- iteration
    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        epoch, start_batch = self.shared[0], self.shared[1] // self.batch_size
        first = start_batch + worker                 # global batch indices worker, worker + W, ...
        if first >= self.num_batches:
            return
        stream = first % workers                     # the stream that produced batch `first`
        raw = self._raw_stream(epoch, stream, workers)
        for _ in range((first // workers) * self.batch_size):     # fast-forward, no decoding
            if next(raw, None) is None:
                return
        self._pending = []                           # counted by the run that consumed them
        for _ in range(first, self.num_batches, workers):
            slots = [s for s in (next(raw, None) for _ in range(self.batch_size)) if s is not None]
            if len(slots) < self.batch_size:
                raise RuntimeError(f"{self.name}: the shards ran dry mid-batch; no readable samples left")
            yield self._batch(slots, raw, epoch)

    def _raw_stream(self, epoch, stream, workers):
        """Raw samples (dicts of member bytes) of one stream, pass after pass, deterministic.
        Each pass is one permutation of the shards (resampled: len(shards) random draws),
        shuffled through its own buffer, so a pass holds every sample once."""
        streams, me = self.world * workers, self.rank * workers + stream
        rng = random.Random(mix_seed(self.seed, epoch, self.rank, stream, workers))
        by_shard = self.resampled or len(self.shards) >= streams
        for rnd in itertools.count():
            if self.resampled:
                urls = [rng.choice(self.shards) for _ in self.shards]
            else:
                order = random.Random(mix_seed(self.seed, epoch, rnd)).sample(self.shards, len(self.shards))
                urls = order[me::streams] if by_shard else order
            samples = wds.tarfile_to_samples(handler=self._bad_shard, rename_files=self.rename)(
                iter([dict(url=u) for u in urls]))
            if not by_shard:                         # fewer shards than streams: split samples
                samples = (x for n, x in enumerate(samples) if n % streams == me)
            if self.shuffle_buffer > 1:
                samples = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(samples)
            n = 0
            for n, sample in enumerate(samples, 1):
                yield sample
            if n == 0:
                return

    def _batch(self, slots, raw, epoch):
        """batch_size raw samples -> collated batch; unusable ones replaced within the batch."""
        built, good, events, first_error = [None] * len(slots), [], [], None
        keys = [zlib.crc32(f"{os.path.basename(s.get('__url__', ''))}/{s['__key__']}".encode()) for s in slots]
        seeds = mix_seeds(self.seed, epoch, np.array(keys, np.int64)).tolist()     # = mix_seed(seed, epoch, key)
        for k, raw_sample in enumerate(slots):
            events.append('drawn')
            try:
                image, captions, notes = self._decode(raw_sample)
            except Skip as e:
                events.append(e.reason)
                first_error = first_error or str(e)
                self._print(e)
                continue
            events.extend(notes)
            good.append((image, captions))
            built[k] = self.builder(image, captions, seeds[k])
        while not good:                              # a whole batch unusable: read on
            raw_sample = next(raw, None)
            if raw_sample is None:
                raise RuntimeError(f"{self.name}: no usable sample left (first: {first_error})")
            try:
                image, captions, notes = self._decode(raw_sample)
                good.append((image, captions))
            except Skip:
                events.append('retry_failed')
        for k in range(len(slots)):
            if built[k] is None:
                image, captions = good[mix_seed(seeds[k], 1) % len(good)]
                built[k] = self.builder(image, captions, mix_seed(seeds[k], 2))
        events.extend(self._pending)
        self._pending = []
        built[0]['_events'], built[0]['_error'] = events, first_error
        for sample in built[1:]:
            sample['_events'], sample['_error'] = [], None
        return collate(built)

    def _decode(self, raw_sample):
        where = f"{raw_sample.get('__url__', '?')}:{raw_sample['__key__']}"
        text_ext = next((e for e in TEXT_EXTS if e in raw_sample), None)
        if text_ext is None:
            raise Skip('caption_missing', where, 'no .txt member')
        captions, notes = clean_captions(raw_sample[text_ext], f'{where}.{text_ext}')
        image_ext = next((e for e in IMAGE_EXTS if e in raw_sample), None)
        if image_ext is None:
            raise Skip('missing_file', where, 'no image member')
        image, note = decode_image(raw_sample[image_ext], f'{where}.{image_ext}', self.opts)
        return image, captions, notes + ([note] if note else [])

    def _bad_shard(self, exn):
        """webdataset error handler: a truncated / corrupt tar is counted and skipped."""
        self._pending.append('bad_shard')
        texts = [a for a in getattr(exn, 'args', ()) if isinstance(a, str)]
        url = next((a for a in reversed(texts) if a in self.shards), '?')
        self._print(f"bad_shard: {url} ({texts[0] if texts else type(exn).__name__})")
        return True

    def _print(self, e):
        self._printed += 1
        if self._printed <= PRINT_FIRST:
            print(f"data: skipped {e}")

    def probe(self):
        """Decode the first PROBE samples (from the first shards); stop when most fail."""
        errors = []
        src = wds.tarfile_to_samples(handler=lambda e: errors.append(e) or True, rename_files=self.rename)(
            iter([dict(url=u) for u in self.shards[:4]]))
        failures, n = [], 0
        for raw_sample in src:
            n += 1
            try:
                self._decode(raw_sample)
            except Skip as e:
                failures.append(str(e))
            if n >= PROBE:
                break
        if n == 0:
            why = f"cannot read {self.shards[0]}: {errors[0]}" if errors else f"no samples in {self.shards[0]}"
            raise DataError(f"{self.name}: {str(why).splitlines()[0][:300]}; expected {self.layout}")
        if 2 * len(failures) > n:
            raise DataError(f"{self.name}: {len(failures)} of {n} probed samples are unusable "
                            f"(first: {failures[0]}); expected {self.layout}")
        return len(failures), n


# ----------------------------------------------------------------------------- shard lists

def expand_shards(spec):
    """'a/{000..009}.tar::b/x.tar' or a folder of .tar files -> list of shard paths."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, '*.tar')))
    return list(wds.shardlists.expand_urls(spec))


def local_shards(name, spec, layout):
    """Expanded shards; the missing ones dropped with a warning, none existing = error."""
    shards = expand_shards(spec) if spec else []
    if not shards:
        raise DataError(f"{name}: no shards in --root {spec!r}; expected {layout}")
    remote = [s for s in shards if re.match(r'^[a-z]+:', s)]
    present = [s for s in shards if s in remote or os.path.isfile(s)]
    if not present:
        raise DataError(f"{name}: none of the {len(shards)} shards exists (first: {shards[0]}); "
                        f"expected {layout}")
    if len(present) < len(shards):
        missing = [s for s in shards if s not in present]
        print(f"{name}: {len(missing)} of {len(shards)} shards are missing and ignored (first: {missing[0]})")
    return present


def count_samples(shards):
    """Samples in the shards from img2dataset's *_stats.json or OpenCLIP's sizes.json; None
    when some shard has neither."""
    total, sizes_cache = 0, {}
    for shard in shards:
        folder, base = os.path.split(shard)
        stats = os.path.join(folder, os.path.splitext(base)[0] + '_stats.json')
        if os.path.isfile(stats):
            with open(stats) as f:
                total += int(json.load(f).get('successes', 0))
            continue
        if folder not in sizes_cache:
            path = os.path.join(folder, 'sizes.json')
            sizes_cache[folder] = json.load(open(path)) if os.path.isfile(path) else {}
        if base not in sizes_cache[folder]:
            return None
        total += int(sizes_cache[folder][base])
    return total


def tarpairs_shards(root, metadata, allow_pickle):
    """The metadata dict {'0-1000': 'x.tar.gz', ...} -> (archive paths, number of pairs)."""
    if not os.path.isfile(metadata):
        raise DataError(f"tarpairs: metadata file not found: {metadata!r}; expected {TARPAIRS_LAYOUT}")
    if metadata.endswith(('.pkl', '.pickle')):
        from metadata import _load_pickle_or_npy
        table = _load_pickle_or_npy(metadata, '.pkl', allow_pickle)
    else:
        try:
            with open(metadata, encoding='utf-8') as f:
                table = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"tarpairs {metadata}: not JSON ({e}); expected {TARPAIRS_LAYOUT}") from None
    ranges = []
    for key, archive in (table.items() if isinstance(table, dict) else []):
        m = re.fullmatch(r'\s*(\d+)\s*-\s*(\d+)\s*', str(key))
        if not m or not isinstance(archive, str) or int(m.group(2)) < int(m.group(1)):
            ranges = None
            break
        ranges.append((int(m.group(1)), int(m.group(2)), archive))
    if not ranges:
        raise DataError(f"tarpairs {metadata}: wrong structure (got {type(table).__name__}); "
                        f"expected {TARPAIRS_LAYOUT}")
    ranges.sort()
    return [os.path.join(root, a) for _, _, a in ranges], sum(b - a for a, b, _ in ranges)


def tarpairs_rename(name):
    """ID_image / ID_text -> ID.image / ID.text, so webdataset groups them by ID."""
    base, sep, kind = name.rpartition('_')
    return f'{base}.{kind}' if sep and kind in ('image', 'text') else name

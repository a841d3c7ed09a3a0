"""Streaming readers over shards: `wds` (WebDataset tar shards as img2dataset writes them:
KEY.jpg/.png/.webp + KEY.txt [+ KEY.json]), `tarpairs` (RangeAugment's .tar.gz archives of
ID_image / ID_text members, listed by a metadata dict: cvnets' {0: '00000000_0_1000.tar.gz', ...,
-1: total pairs} or its README's {'0-1000': '00000000_0_1000.tar.gz'}) and `tfrecord`
(img2dataset's tf.train.Example shards, read by tfrecord.py). A format is its shard reader:
(source dicts, error handler) -> raw samples {'__key__', '__url__', member/feature: bytes}.

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
same --workers. (Only a batch whose samples are *all* unusable reads extra samples.) With
--multiscale the count and image size of batch b come from its multiscale.Schedule instead of
batch_size, as pure functions of (seed, epoch, b): the fast-forward sums the earlier counts.
"""
import glob
import itertools
import json
import multiprocessing as mp
import os
import random
import re
import zlib
from functools import partial

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from decode import Skip, clean_captions, decode_image
from metadata import PICKLE_SUFFIXES, DataError, _describe, load_pickle
from readers import PRINT_FIRST, PROBE, collate, mix_seed, mix_seeds

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'image')
TEXT_EXTS = ('txt', 'text')
WDS_LAYOUT = ("--root 'shards/{00000..01023}.tar' (brace pattern, '::'-separated lists, or a "
              "folder of .tar) with members KEY.jpg/.png/.webp and KEY.txt")
TARPAIRS_LAYOUT = ("--root DIR holding the .tar.gz archives (members ID_image, ID_text) and --metadata "
                   "the dict cvnets pickles, {0: '00000000_0_1000.tar.gz', 1000: '00000000_1000_2000.tar.gz', "
                   "..., -1: TOTAL_PAIRS} (start id -> archive, ascending from 0; a pickle needs "
                   "--allow-pickle, in JSON the keys are strings), or {'0-1000': '00000000_0_1000.tar.gz', ...} "
                   "(id range -> archive)")
TFRECORD_LAYOUT = ("--root 'shards/{00000..01023}.tfrecord' (brace pattern, '::'-separated lists, or a "
                   "folder of .tfrecord / .tfrecord.gz) of tf.train.Example records with features jpg "
                   "(image bytes) and txt (caption), as img2dataset --output_format tfrecord writes them")
TAR_PATTERNS = ('*.tar',)
TFRECORD_PATTERNS = ('*.tfrecord', '*.tfrecord.gz')


def tar_samples(sources, handler, rename=None):
    """The raw samples of tar shards (webdataset groups members by KEY; `rename` maps member
    names first)."""
    return wds.tarfile_to_samples(handler=handler, rename_files=rename)(sources)


class StreamReader(IterableDataset):
    """Yields whole collated batches (use DataLoader(batch_size=None)); see the module doc."""

    def __init__(self, name, layout, shards, num_samples, batch_size, builder, opts, seed=0,
                 rank=0, world=1, resampled=False, shuffle_buffer=1000, shard_reader=tar_samples):
        self.name, self.layout, self.shards = name, layout, list(shards)
        self.batch_size, self.builder, self.opts, self.seed = batch_size, builder, opts, seed
        self.rank, self.world, self.resampled = rank, world, resampled
        self.shuffle_buffer, self.shard_reader = shuffle_buffer, shard_reader
        self.schedule = None                       # multiscale.Schedule: per-batch size and batch
        self.num_batches = num_samples // (world * batch_size)
        self.shared = mp.RawArray('q', 2)          # (epoch, start) seen by persistent workers
        self._pending, self._printed = [], 0
        self._reads = 0                            # shard reads started by this process
        self._reading = self._counted = None       # (read number, url, counts) being read / last counted

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
        sizes, counts = self._plan(epoch)
        for _ in range(int(counts[stream:first:workers].sum())):   # fast-forward, no decoding
            if next(raw, None) is None:
                return
        self._pending = []                           # counted by the run that consumed them
        for b in range(first, self.num_batches, workers):
            slots = [s for s in (next(raw, None) for _ in range(counts[b])) if s is not None]
            if len(slots) < counts[b]:
                raise RuntimeError(f"{self.name}: the shards ran dry mid-batch; no readable samples left")
            if sizes is not None:
                self.schedule.use_size(sizes[b])
            yield self._batch(slots, raw, epoch)

    def _plan(self, epoch):
        """-> (image size per batch or None, samples per batch) of the epoch (--multiscale:
        the multiscale.Schedule's; else batch_size each)."""
        if self.schedule is None:
            return None, np.full(self.num_batches, self.batch_size)
        return self.schedule.plan(epoch, self.num_batches)

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
            samples = self.shard_reader(self._sources(urls, by_shard, streams, me), self._bad_shard)
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
        if '__bad__' in raw_sample:                  # the shard reader could not parse it
            raise Skip('bad_record', where, raw_sample['__bad__'])
        text_ext = next((e for e in TEXT_EXTS if e in raw_sample), None)
        if text_ext is None:
            raise Skip('caption_missing', where, 'no .txt member')
        captions, notes = clean_captions(raw_sample[text_ext], f'{where}.{text_ext}')
        image_ext = next((e for e in IMAGE_EXTS if e in raw_sample), None)
        if image_ext is None:
            raise Skip('missing_file', where, 'no image member')
        image, note = decode_image(raw_sample[image_ext], f'{where}.{image_ext}', self.opts)
        return image, captions, notes + ([note] if note else [])

    def _sources(self, urls, by_shard, streams, me):
        """webdataset's source dicts, noting which shard it reads: it opens the next one only
        when done with the current one. Without by_shard every stream reads every shard, and
        stream k counts the bad ones at positions k, k + streams, ... (each once)."""
        for n, url in enumerate(urls):
            self._reads += 1
            self._reading = (self._reads, url, by_shard or n % streams == me)
            yield dict(url=url)

    def _bad_shard(self, exn):
        """The shard reader's error handler: a truncated / corrupt shard is counted once per
        read and skipped. (One truncated tar member reaches it twice: from the member read,
        then from the tar expander that the same broken stream fails again.)"""
        if self._reading == self._counted:
            return True
        self._counted = self._reading
        _, url, counts = self._reading
        if counts:
            self._pending.append('bad_shard')
            texts = [a for a in getattr(exn, 'args', ()) if isinstance(a, str)]
            self._print(f"bad_shard: {url} ({texts[0] if texts else type(exn).__name__})")
        return True

    def _print(self, e):
        self._printed += 1
        if self._printed <= PRINT_FIRST:
            print(f"data: skipped {e}")

    def probe(self):
        """Decode the first PROBE samples (from the first shards); stop when most fail."""
        errors = []
        src = self.shard_reader(iter([dict(url=u) for u in self.shards[:4]]),
                                lambda e: errors.append(e) or True)
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

def expand_shards(spec, patterns=TAR_PATTERNS):
    """'a/{000..009}.tar::b/x.tar' or a folder of shards (file names matching `patterns`)
    -> list of shard paths."""
    if os.path.isdir(spec):
        return sorted(p for pattern in patterns for p in glob.glob(os.path.join(spec, pattern)))
    return list(wds.shardlists.expand_urls(spec))


def local_shards(name, spec, layout, patterns=TAR_PATTERNS):
    """Expanded shards; the missing ones dropped with a warning, none existing = error."""
    shards = expand_shards(spec, patterns) if spec else []
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
    when some shard has neither. (00000.tar, 00000.tfrecord and 00000.tfrecord.gz all have
    00000_stats.json.)"""
    total, sizes_cache = 0, {}
    for shard in shards:
        folder, base = os.path.split(shard)
        stem = os.path.splitext(base[:-len('.gz')] if base.endswith('.gz') else base)[0]
        stats = os.path.join(folder, stem + '_stats.json')
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
    """The metadata dict (either form in TARPAIRS_LAYOUT) -> (archive paths in id order,
    number of pairs)."""
    ranges = tarpairs_ranges(_read_tarpairs_metadata(metadata, allow_pickle), f"tarpairs {metadata}")
    return [os.path.join(root, a) for _, _, a in ranges], sum(end - start for start, end, _ in ranges)


def _read_tarpairs_metadata(metadata, allow_pickle):
    """The dict in a JSON file or a pickle (cvnets pickles it under any name: told apart by
    the PROTO opcode b'\\x80' that starts every pickle of protocol 2 or later)."""
    if not os.path.isfile(metadata):
        raise DataError(f"tarpairs: metadata file not found: {metadata!r}; expected {TARPAIRS_LAYOUT}")
    with open(metadata, 'rb') as f:
        is_pickle = f.read(1) == b'\x80' or metadata.endswith(PICKLE_SUFFIXES)
    try:
        if is_pickle:
            return load_pickle(metadata, allow_pickle, "save the same dict as JSON")
        with open(metadata, encoding='utf-8') as f:
            return json.load(f)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 -- truncated pickle, bad JSON, not UTF-8, ...
        first = (str(e).splitlines() or [''])[0][:120]
        raise DataError(f"tarpairs {metadata}: cannot read it as {'a pickle' if is_pickle else 'JSON'} "
                        f"({type(e).__name__}: {first}); expected {TARPAIRS_LAYOUT}") from None


def tarpairs_ranges(table, where):
    """Either metadata form -> [(first id, end id (exclusive), archive)] in id order."""
    if not isinstance(table, dict) or not table:
        raise DataError(f"{where}: wrong structure (got {_describe(table)}); expected {TARPAIRS_LAYOUT}")
    if all(_start_id(k) is not None for k in table):
        return _start_id_ranges({_start_id(k): v for k, v in table.items()}, where)
    ranges = []
    for key, archive in table.items():
        m = re.fullmatch(r'\s*(\d+)\s*-\s*(\d+)\s*', key) if isinstance(key, str) else None
        if not m or int(m.group(2)) < int(m.group(1)):
            raise DataError(f"{where}: keys must be all integer start ids (plus -1: total pairs) or all "
                            f"id ranges 'a-b', got {key!r}; expected {TARPAIRS_LAYOUT}")
        ranges.append((int(m.group(1)), int(m.group(2)), _archive(key, archive, where)))
    return sorted(ranges)


def _start_id_ranges(table, where):
    """cvnets' form {start id: archive, ..., -1: total pairs}. cvnets finds the archive of
    sample i by searchsorted over the keys in dict order (so they must ascend from 0); archive
    k holds ids [key_k, key_k+1), the last one up to the total."""
    total = table.pop(-1, None)
    if not isinstance(total, (int, np.integer)) or isinstance(total, bool):
        raise DataError(f"{where}: integer start-id keys need the entry -1: <total pairs> (an integer), "
                        f"got {_describe(total)}; expected {TARPAIRS_LAYOUT}")
    starts = list(table)
    if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or total <= starts[-1]:
        raise DataError(f"{where}: start ids must ascend from 0 in file order and stay below the "
                        f"total -1: {total} (got {_describe(starts)}); expected {TARPAIRS_LAYOUT}")
    ends = starts[1:] + [int(total)]
    return [(a, b, _archive(a, table[a], where)) for a, b in zip(starts, ends)]


def _start_id(key):
    """An integer key (int, NumPy integer, or a JSON object's '123' / '-1') -> int, else None."""
    if isinstance(key, str) and re.fullmatch(r'-?\d+', key.strip()):
        return int(key)
    return int(key) if isinstance(key, (int, np.integer)) and not isinstance(key, bool) else None


def _archive(key, archive, where):
    if not isinstance(archive, str) or not archive:
        raise DataError(f"{where}: the archive of {key!r} is {_describe(archive)}, not a file name; "
                        f"expected {TARPAIRS_LAYOUT}")
    return archive


def tarpairs_rename(name):
    """ID_image / ID_text -> ID.image / ID.text, so webdataset groups them by ID."""
    base, sep, kind = name.rpartition('_')
    return f'{base}.{kind}' if sep and kind in ('image', 'text') else name


tarpairs_samples = partial(tar_samples, rename=tarpairs_rename)

"""Tiny image-caption datasets in the real on-disk layouts, for the data tests: zip trees
(yfcc15m), .npy / .pkl / .jsonl metadata (cc3m, cc12m), tar shards (wds), .tar.gz + metadata
dict (tarpairs), TFRecord shards (tfrecord: an encoder of the record framing and of
tf.train.Example of its own), CSV/TSV, COCO JSON, folder pairs -- with bad samples of every
kind mixed in.

A dataset is a list of specs (image kind, caption kind); each writer returns the main.py
flags that read it, and `expected_counts` the exact events the run must log.
"""
import gzip
import hashlib
import io
import json
import os
import pickle
import random
import struct
import tarfile
import zipfile
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

GOOD_IMAGES = ('jpeg', 'png')
CONVERTED = {'cmyk': 'image_cmyk', 'gray16': 'image_16bit', 'palette': 'image_palette',
             'palette_alpha': 'image_palette', 'rgba': 'image_alpha', 'la': 'image_alpha',
             'gray': 'image_gray'}
BAD_IMAGES = {'garbage': 'corrupt_image', 'trunc_jpeg': 'corrupt_image', 'trunc_png': 'corrupt_image',
              'zero': 'empty_file', 'missing': 'missing_file', 'bomb_png': 'too_large',
              'bomb_jpeg': 'too_large'}
BAD_CAPTIONS = {'empty': 'caption_empty', 'none': 'caption_missing', 'bad_utf8': 'caption_not_utf8'}
LONG = 'caption_truncated'
NOT_IN = {'folder': {'missing', 'none'}}      # kinds a layout cannot express


# ----------------------------------------------------------------------------- images

def _pixels(seed, w, h):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                     np.full_like(x, (seed * 37) % 256)], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(seed=0, w=64, h=48, quality=90):
    return encode(Image.fromarray(_pixels(seed, w, h)), 'JPEG', quality=quality)


@lru_cache(maxsize=None)
def _bomb_png():
    """A real decompression bomb: 20000 x 20000 1-bit PNG of zeros (~50 KB on disk)."""
    w = h = 20000
    raw = zlib.compress((b'\x00' + b'\x00' * ((w + 7) // 8)) * h, 9)

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 1, 0, 0, 0, 0))
            + chunk(b'IDAT', raw) + chunk(b'IEND', b''))


def _bomb_jpeg():
    """A small JPEG whose header claims 10000 x 10000 pixels (over the 89.5 M default cap)."""
    data = bytearray(jpeg(1))
    i = data.index(b'\xff\xc0')                 # SOF0: length(2) precision(1) height(2) width(2)
    data[i + 5:i + 9] = struct.pack('>HH', 10000, 10000)
    return bytes(data)


def image_bytes(kind, seed=0):
    """Bytes of one image of `kind` (None for 'missing')."""
    rgb = Image.fromarray(_pixels(seed, 64, 48))
    if kind == 'jpeg':
        return jpeg(seed)
    if kind == 'png':
        return encode(rgb, 'PNG')
    if kind == 'cmyk':
        return encode(rgb.convert('CMYK'), 'JPEG')
    if kind == 'gray16':
        return encode(Image.fromarray((_pixels(seed, 64, 48)[..., 0].astype(np.uint16) * 257)), 'PNG')
    if kind == 'palette':
        return encode(rgb.convert('P'), 'PNG')
    if kind == 'palette_alpha':
        return encode(rgb.convert('P'), 'PNG', transparency=0)
    if kind == 'rgba':
        return encode(rgb.convert('RGBA'), 'PNG')
    if kind == 'la':
        return encode(rgb.convert('LA'), 'PNG')
    if kind == 'gray':
        return encode(rgb.convert('L'), 'JPEG')
    if kind == 'garbage':
        return b'this is not an image ' * 20
    if kind == 'trunc_jpeg':
        data = jpeg(seed, 200, 150)
        return data[:len(data) // 2]
    if kind == 'trunc_png':
        data = encode(Image.fromarray(_pixels(seed, 200, 150)), 'PNG')
        return data[:len(data) // 2]
    if kind == 'zero':
        return b''
    if kind == 'bomb_png':
        return _bomb_png()
    if kind == 'bomb_jpeg':
        return _bomb_jpeg()
    if kind == 'missing':
        return None
    raise ValueError(kind)


# ----------------------------------------------------------------------------- captions

def caption(kind, i):
    """A caption of `kind` as a Python value (str / None; bad UTF-8 as a lone surrogate)."""
    return {'ok': f'a photo of item {i}', 'long': 'word ' * 2000 + f'item {i}', 'empty': '  <b></b> ',
            'none': None, 'bad_utf8': f'bad \udcff caption {i}'}[kind]


def caption_bytes(kind, i):
    """The same as file bytes (None = no caption file)."""
    if kind == 'bad_utf8':
        return b'bad \xff\xfe caption %d' % i
    text = caption(kind, i)
    return None if text is None else text.encode()


# ----------------------------------------------------------------------------- specs

def specs(n_good=8, bad_each=0, converted_each=0, long_each=0, skip=(), seed=0):
    """[(image kind, caption kind)]: good samples, every bad kind `bad_each` times, every
    converted mode `converted_each` times; shuffled, with the first 16 and every probe
    position good (the start-up probe is tested on its own)."""
    out = [(GOOD_IMAGES[i % 2], 'ok') for i in range(n_good)]
    out += [(k, 'ok') for k in BAD_IMAGES if k not in skip for _ in range(bad_each)]
    out += [('jpeg', k) for k in BAD_CAPTIONS if k not in skip for _ in range(bad_each)]
    out += [(k, 'ok') for k in CONVERTED for _ in range(converted_each)]
    out += [('jpeg', 'long') for _ in range(long_each)]
    rng = random.Random(seed)
    rng.shuffle(out)
    protected = set(range(min(16, len(out)))) | {int(i) for i in np.linspace(0, len(out) - 1, min(16, len(out)))}
    goods = [i for i, s in enumerate(out) if s == ('jpeg', 'ok') or s == ('png', 'ok')]
    spare = [i for i in goods if i not in protected]
    for p in sorted(protected):
        if out[p] not in (('jpeg', 'ok'), ('png', 'ok')):
            j = spare.pop()
            out[p], out[j] = out[j], out[p]
    return out


def expected_counts(sample_specs):
    """The events a full epoch over these specs must log (captions are checked first)."""
    counts = {'drawn': len(sample_specs)}
    for image, cap in sample_specs:
        event = BAD_CAPTIONS.get(cap) or BAD_IMAGES.get(image) or CONVERTED.get(image)
        if cap == 'long':
            event = LONG
        if event:
            counts[event] = counts.get(event, 0) + 1
    return counts


# ----------------------------------------------------------------------------- layouts

def write_files(folder, sample_specs, ext_of=lambda k: 'png' if 'png' in k or k in ('palette', 'palette_alpha', 'rgba', 'la', 'gray16') else 'jpg'):
    """Images as files folder/img/NNNNN.ext (missing ones not written) -> relative paths."""
    os.makedirs(os.path.join(folder, 'img'), exist_ok=True)
    paths = []
    for i, (kind, _) in enumerate(sample_specs):
        rel = os.path.join('img', f'{i:05d}.{ext_of(kind)}')
        data = image_bytes(kind, i)
        if data is not None:
            with open(os.path.join(folder, rel), 'wb') as f:
                f.write(data)
        paths.append(rel)
    return paths


def write_yfcc(root, sample_specs, meta_format='jsonl', first_index=12345000):
    """root/images/XX/YYY.zip members ZZZ.jpg + metadata (index, title, description)."""
    rows = []
    zips = {}
    for i, (kind, cap) in enumerate(sample_specs):
        index = first_index + i * 7                   # spread over several zip archives
        digits = f'{index:08d}'
        path = os.path.join(root, 'images', digits[:2], digits[2:5] + '.zip')
        data = image_bytes(kind, i)
        zips.setdefault(path, [])
        if data is not None:
            zips[path].append((digits[5:] + '.jpg', data))
        title = caption(cap, i)
        rows.append((index, title, '' if cap == 'ok' else (None if cap == 'none' else ' ')))
    for path, members in zips.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with zipfile.ZipFile(path, 'w') as z:
            for name, data in members:
                z.writestr(name, data)
    meta = os.path.join(root, f'yfcc15m.{meta_format}')
    if meta_format == 'pkl':
        with open(meta, 'wb') as f:
            pickle.dump(rows, f)
    elif meta_format == 'jsonl':
        _jsonl(meta, [{'index': r[0], 'title': r[1], 'description': r[2]} for r in rows])
    elif meta_format == 'npz':
        from metadata import build_records
        build_records('yfcc15m', [r[0] for r in rows], [[r[1], r[2]] for r in rows]).save(meta)
    return ['--dataset', 'yfcc15m', '--root', root, '--metadata', meta]


def write_cc(root, sample_specs, kind='cc3m', meta_format='npy'):
    """Images under root + an upstream .npy object array of dicts (or .jsonl)."""
    paths = write_files(root, sample_specs)
    rows = []
    for i, ((_, cap), rel) in enumerate(zip(sample_specs, paths)):
        captions = [caption(cap, i)] if cap != 'none' else None
        rows.append({'image_id': rel, 'captions': captions} if kind == 'cc3m'
                    else {'image_name': rel, 'image_id': i, 'captions': captions})
    meta = os.path.join(root, f'{kind}.{meta_format}')
    if meta_format == 'npy':
        np.save(meta, np.array(rows, dtype=object), allow_pickle=True)
    else:
        _jsonl(meta, rows)
    return ['--dataset', kind, '--root', root, '--metadata', meta]


def write_csv(root, sample_specs, sep='\t', img_key='filepath', caption_key='title'):
    """OpenCLIP CSV: header + rows (a None caption = a short row; bad UTF-8 = raw bytes)."""
    paths = write_files(root, sample_specs)
    meta = os.path.join(root, 'train.csv' if sep == ',' else 'train.tsv')
    with open(meta, 'wb') as f:
        f.write(f'{img_key}{sep}{caption_key}{sep}other\n'.encode())
        for i, ((_, cap), rel) in enumerate(zip(sample_specs, paths)):
            text = caption_bytes(cap, i)
            if text is None:
                f.write(rel.encode() + b'\n')
            else:
                f.write(rel.encode() + sep.encode() + b'"' + text.replace(b'"', b'""') + b'"' + sep.encode() + b'x\n')
    flags = ['--dataset', 'csv', '--metadata', meta]
    if sep != '\t':
        flags += ['--csv-separator', sep]
    if img_key != 'filepath':
        flags += ['--csv-img-key', img_key, '--csv-caption-key', caption_key]
    return flags


def write_coco(root, sample_specs):
    """root/train2017/*.jpg + root/annotations/captions_train2017.json, five captions each."""
    images, anns = [], []
    os.makedirs(os.path.join(root, 'train2017'), exist_ok=True)
    for i, (kind, cap) in enumerate(sample_specs):
        image_id = 1000 + i * 3
        name = f'{image_id:012d}.jpg'
        data = image_bytes(kind, i)
        if data is not None:
            with open(os.path.join(root, 'train2017', name), 'wb') as f:
                f.write(data)
        images.append({'id': image_id, 'file_name': name, 'width': 64, 'height': 48})
        for k in range(5):
            text = caption(cap, i)
            anns.append({'id': len(anns), 'image_id': image_id,
                         'caption': text + f' ({k})' if cap in ('ok', 'long') else text})
    meta = os.path.join(root, 'annotations', 'captions_train2017.json')
    os.makedirs(os.path.dirname(meta), exist_ok=True)
    with open(meta, 'w') as f:
        json.dump({'info': {}, 'images': images, 'annotations': anns}, f)
    return ['--dataset', 'coco', '--root', root, '--metadata', meta]


def write_folder(root, sample_specs):
    """train-CLIP layout: images in images/<sub>/, captions in texts/<other sub>/, by stem."""
    for i, (kind, cap) in enumerate(sample_specs):
        data, text = image_bytes(kind, i), caption_bytes(cap, i)
        img_dir = os.path.join(root, 'images', f'part{i % 3}')
        txt_dir = os.path.join(root, 'texts', f'group{i % 4}')
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(txt_dir, exist_ok=True)
        ext = 'png' if kind in ('png', 'palette', 'palette_alpha', 'rgba', 'la', 'gray16', 'trunc_png', 'bomb_png') else 'jpg'
        with open(os.path.join(img_dir, f'sample{i:05d}.{ext}'), 'wb') as f:
            f.write(data)
        if cap == 'ok':
            text = text + b'\nsecond caption of item %d\n' % i
        with open(os.path.join(txt_dir, f'sample{i:05d}.txt'), 'wb') as f:
            f.write(text if cap != 'empty' else b'\n  \n')
    return ['--dataset', 'folder', '--root', root]


def write_wds(root, sample_specs, shards=4, stats=False):
    """img2dataset-style shards root/{00000..N}.tar: KEY.jpg / KEY.txt / KEY.json."""
    os.makedirs(root, exist_ok=True)
    per = -(-len(sample_specs) // shards)
    for s in range(shards):
        part = list(enumerate(sample_specs))[s * per:(s + 1) * per]
        path = os.path.join(root, f'{s:05d}.tar')
        with tarfile.open(path, 'w') as tar:
            for i, (kind, cap) in part:
                key = f'{s:05d}{i:04d}'
                ext = 'png' if 'png' in kind or kind in ('palette', 'palette_alpha', 'rgba', 'la', 'gray16') else 'jpg'
                members = [(f'{key}.{ext}', image_bytes(kind, i)), (f'{key}.txt', caption_bytes(cap, i)),
                           (f'{key}.json', json.dumps({'key': key, 'status': 'success'}).encode())]
                for name, data in members:
                    if data is not None:
                        _add(tar, name, data)
        if stats:
            with open(os.path.join(root, f'{s:05d}_stats.json'), 'w') as f:
                json.dump({'successes': len(part)}, f)
    return ['--dataset', 'wds', '--root', os.path.join(root, '{00000..%05d}.tar' % (shards - 1))]


# ----------------------------------------------------------------------------- TFRecord encoder

def _crc32c_table():
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)
    return table


_CRC32C = _crc32c_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data):
    """One TFRecord: length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
    length = struct.pack('<Q', len(data))
    return length + struct.pack('<I', masked_crc32c(length)) + data + struct.pack('<I', masked_crc32c(data))


def _varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number, payload):
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _repeated(encoded, wire_type, packed):
    """Field 1 (`value`) of a numeric list: one packed length-delimited field, or one field
    of `wire_type` (0 varint, 5 fixed32) per value."""
    if packed:
        return _field(1, b''.join(encoded))
    return b''.join(_varint(1 << 3 | wire_type) + e for e in encoded)


def example_bytes(features, packed=True):
    """{name: bytes | str | int | float | list of one kind} -> a serialized tf.train.Example
    (Feature: 1 bytes_list, 2 float_list, 3 int64_list; each list's field 1 `value`). Ints
    and floats are packed, as TensorFlow writes them, or one field each with packed=False."""
    entries = b''
    for name, value in features.items():
        values = value if isinstance(value, list) else [value]
        if all(isinstance(v, (bytes, str)) for v in values):
            feature = _field(1, b''.join(_field(1, v.encode() if isinstance(v, str) else v) for v in values))
        elif all(isinstance(v, int) for v in values):
            ints = [_varint(v & 0xFFFFFFFFFFFFFFFF) for v in values]       # two's complement, as int64
            feature = _field(3, _repeated(ints, 0, packed))
        else:
            feature = _field(2, _repeated([struct.pack('<f', v) for v in values], 5, packed))
        entries += _field(1, _field(1, name.encode()) + _field(2, feature))   # map entry (key, value)
    return _field(1, entries)                                                 # Example.features


def write_records(path, payloads, compress=False):
    """A TFRecord file of these serialized records (gzip-compressed with `compress`)."""
    data = b''.join(frame_record(p) for p in payloads)
    with (gzip.open if compress else open)(path, 'wb') as f:
        f.write(data)


def record_spans(path):
    """[(offset of the record, offset of its data, data length)] of an uncompressed TFRecord
    file (to damage one record in tests)."""
    with open(path, 'rb') as f:
        blob = f.read()
    spans, at = [], 0
    while at < len(blob):
        length = struct.unpack('<Q', blob[at:at + 8])[0]
        spans.append((at, at + 12, length))
        at += 16 + length
    return spans


def img2dataset_example(key, image, text, url=''):
    """The features img2dataset's TFRecordSampleWriter writes: key, jpg, txt and the metadata
    columns (url, caption, key, status, error_message, width, height, original_width,
    original_height, exif, sha256); a None image / caption leaves out jpg / txt (img2dataset
    writes only successes: the other layouts' bad kinds, expressed here)."""
    features = {'key': key}
    if image is not None:
        features['jpg'] = image
    if text is not None:
        features['txt'] = text
    features.update({'url': url or f'https://example.com/{key}.jpg', 'caption': text or b'',
                     'status': 'success', 'error_message': '', 'width': 64, 'height': 48,
                     'original_width': 640, 'original_height': 480, 'exif': '{}',
                     'sha256': hashlib.sha256(image or b'').hexdigest()})
    return example_bytes(features)


def write_tfrecord(root, sample_specs, shards=4, stats=False, compressed=(), pattern=False):
    """img2dataset --output_format tfrecord: root/00000.tfrecord ... (shard numbers in
    `compressed`: gzip-compressed, 0000k.tfrecord.gz), with 0000k_stats.json when `stats`.
    --root is the folder (or, with `pattern`, the brace pattern of uncompressed shards)."""
    os.makedirs(root, exist_ok=True)
    per = -(-len(sample_specs) // shards)
    for s in range(shards):
        part = list(enumerate(sample_specs))[s * per:(s + 1) * per]
        payloads = [img2dataset_example(f'{s:05d}{i:04d}', image_bytes(kind, i), caption_bytes(cap, i))
                    for i, (kind, cap) in part]
        gz = s in compressed
        write_records(os.path.join(root, f'{s:05d}.tfrecord' + '.gz' * gz), payloads, compress=gz)
        if stats:
            with open(os.path.join(root, f'{s:05d}_stats.json'), 'w') as f:
                json.dump({'count': len(part), 'successes': len(part), 'failed_to_download': 0}, f)
    spec = os.path.join(root, '{00000..%05d}.tfrecord' % (shards - 1)) if pattern else root
    return ['--dataset', 'tfrecord', '--root', spec]


def write_tarpairs(root, sample_specs, per_archive=50, form='ranges', meta_name=None):
    """RangeAugment: root/00000000_<a>_<b>.tar.gz with members 00000000_<id>_image / _text,
    and the metadata dict of `form`: 'ranges' = its README's {'a-b': archive} as metadata.json;
    'cvnets' = what cvnets' img_text_tar code reads: {a: archive, ..., -1: total pairs}
    pickled (pickle.dump, default protocol) as metadata.pkl."""
    os.makedirs(root, exist_ok=True)
    table = {}
    for a in range(0, len(sample_specs), per_archive):
        b = min(a + per_archive, len(sample_specs))
        name = f'00000000_{a}_{b}.tar.gz'
        with tarfile.open(os.path.join(root, name), 'w:gz') as tar:
            for i in range(a, b):
                kind, cap = sample_specs[i]
                for suffix, data in (('image', image_bytes(kind, i)), ('text', caption_bytes(cap, i))):
                    if data is not None:
                        _add(tar, f'00000000_{i}_{suffix}', data)
        table[a if form == 'cvnets' else f'{a}-{b}'] = name
    meta = os.path.join(root, meta_name or ('metadata.pkl' if form == 'cvnets' else 'metadata.json'))
    if form == 'cvnets':
        table[-1] = len(sample_specs)
        with open(meta, 'wb') as f:
            pickle.dump(table, f)
    else:
        with open(meta, 'w') as f:
            json.dump(table, f)
    return ['--dataset', 'tarpairs', '--root', root, '--metadata', meta]


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jsonl(path, rows):
    with open(path, 'w', encoding='utf-8', errors='surrogatepass') as f:
        for row in rows:
            f.write(json.dumps(row) + '\n')


def write_shapes(root, sample_specs):
    """`shapes` is generated at start-up: no files, a small training set."""
    return ['--dataset', 'shapes', '--shapes-num-train', str(max(64, len(sample_specs)))]


def write_merged(root, sample_specs):
    """Upstream merged_opendata: cc3m.npy---cc12m.npy---yfcc15m.pkl (a third of the samples
    each), roots joined the same way."""
    a, b = len(sample_specs) // 3, 2 * len(sample_specs) // 3
    parts = [write_cc(os.path.join(root, 'cc3m'), sample_specs[:a], 'cc3m'),
             write_cc(os.path.join(root, 'cc12m'), sample_specs[a:b], 'cc12m'),
             write_yfcc(os.path.join(root, 'yfcc'), sample_specs[b:], 'pkl')]
    return ['--dataset', 'merged_opendata', '--root', '---'.join(p[3] for p in parts),
            '--metadata', '---'.join(p[5] for p in parts), '--allow-pickle']


# One fixture writer per registered --dataset format (datasets.DATASETS): (root, specs) -> the
# main.py flags that read it. The tests enumerate the registry and fail for a format missing here.
WRITERS = {
    'shapes': write_shapes,
    'yfcc15m': lambda r, s: write_yfcc(r, s, 'npz'),
    'cc3m': lambda r, s: write_cc(r, s, 'cc3m', 'npy') + ['--allow-pickle'],      # the upstream object array
    'cc12m': lambda r, s: write_cc(r, s, 'cc12m', 'jsonl'),
    'merged': write_merged,
    'wds': lambda r, s: write_wds(r, s, stats=True),           # img2dataset's *_stats.json give the epoch
    'tarpairs': lambda r, s: write_tarpairs(r, s, per_archive=5),
    'tfrecord': lambda r, s: write_tfrecord(r, s, stats=True, compressed=(1,)),    # one gzip shard
    'csv': write_csv,
    'coco': write_coco,
    'folder': write_folder,
}
# Formats the bad-sample fuzz test leaves out, and why.
NOT_FUZZED = {'shapes': 'generated in memory: no bad samples possible',
              'merged': 'a union of yfcc15m / cc3m / cc12m readers, each fuzzed on its own'}

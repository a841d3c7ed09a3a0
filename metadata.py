"""Metadata files of the image-caption formats, read without executing code, into compact
`Records` (numpy arrays of UTF-8 bytes + offsets: small, and shared by forked DataLoader
workers without copy-on-write growth).

Safe formats: our `.npz` (written by make_dataset.py), `.jsonl`, `.json` (a list of
records), `.parquet` (needs pyarrow), `.npy` structured arrays. Upstream pickles
(`yfcc15m.pkl`) and `.npy` object arrays (`cc3m.npy`, `cc12m.npy`) run code when loaded:
they are read only with --allow-pickle, with a warning (convert them once with
`python make_dataset.py convert`).

Record schemas (upstream):
    yfcc15m  (index, title, description)              image root/images/XX/YYY.zip:ZZZ.jpg
    cc3m     {'image_id': path, 'captions': [str]}    image root/<image_id>
    cc12m    {'image_name': path, 'image_id': ..., 'captions': [str]}   image root/<image_name>
"""
import json
import os
import pickle
import warnings
from dataclasses import dataclass

import numpy as np

from decode import NONE_CAPTION

SCHEMAS = {
    'yfcc15m': "records (index, title, description), e.g. [(12345678, 'a title', 'a description'), ...] "
               "or a table with columns index, title, description",
    'cc3m': "records {'image_id': <image path relative to --root>, 'captions': [str, ...]}",
    'cc12m': "records {'image_name': <image path relative to --root>, 'image_id': ..., "
             "'captions': [str, ...]}",
}
SAFE_SUFFIXES = ('.npz', '.jsonl', '.json', '.parquet', '.npy')
PICKLE_SUFFIXES = ('.pkl', '.pickle')


class DataError(ValueError):
    """Bad data source (wrong path, wrong structure): one line naming what was expected."""


# ----------------------------------------------------------------------------- columns

class StringColumn:
    """N strings as one uint8 array of UTF-8 bytes plus int64 offsets [N+1]."""

    def __init__(self, blob, offsets):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_strings(cls, strings):
        encoded = [s.encode('utf-8', 'surrogatepass') for s in strings]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b''.join(encoded), np.uint8).copy(), offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode('utf-8', 'surrogatepass')


@dataclass
class Records:
    """One row per sample: `keys` (int64 photo indices for yfcc15m, else a StringColumn of
    image paths) and a variable number of raw captions per row (`NONE_CAPTION` = None)."""
    kind: str
    keys: object
    texts: StringColumn
    starts: np.ndarray           # int64 [N+1]: captions of row i are texts[starts[i]:starts[i+1]]
    bad_rows: int = 0            # rows whose structure was wrong (key '' / -1: skipped as bad_record)

    def __len__(self):
        return len(self.starts) - 1

    def captions(self, i):
        return [self.texts[j] for j in range(self.starts[i], self.starts[i + 1])]

    def key(self, i):
        k = self.keys[i]
        return int(k) if isinstance(self.keys, np.ndarray) else k

    def save(self, path):
        """Write the safe `.npz` form (np.load(..., allow_pickle=False) reads it)."""
        keys = self.keys if isinstance(self.keys, np.ndarray) else None
        extra = {'key_blob': self.keys.blob, 'key_offsets': self.keys.offsets} if keys is None else {'keys': keys}
        np.savez(path, kind=np.array(self.kind), text_blob=self.texts.blob,
                 text_offsets=self.texts.offsets, starts=self.starts, **extra)


def build_records(kind, keys, captions, bad_rows=0):
    """keys: list of int (yfcc15m) or str paths; captions: list of lists of raw captions."""
    starts = np.zeros(len(captions) + 1, np.int64)
    np.cumsum([len(c) for c in captions], out=starts[1:])
    texts = StringColumn.from_strings([_text(c) for caps in captions for c in caps])
    key_col = np.asarray(keys, np.int64) if kind == 'yfcc15m' else StringColumn.from_strings(keys)
    return Records(kind, key_col, texts, starts, bad_rows)


def _text(caption):
    """A raw caption as stored: str as is, bytes decoded (undecodable bytes kept as
    surrogates, so they are skipped as caption_not_utf8 later), anything else = None."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (bytes, bytearray)):
        return bytes(caption).decode('utf-8', 'surrogateescape')
    return NONE_CAPTION


# ----------------------------------------------------------------------------- loading

def load_records(path, kind=None, allow_pickle=False):
    """Read a metadata file -> Records. `kind` None infers it from the first record."""
    if not os.path.isfile(path):
        raise DataError(f"metadata file not found: {path!r} (pass --metadata FILE)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == '.npz':
        return _load_npz(path, kind)
    try:
        if suffix in PICKLE_SUFFIXES or suffix == '.npy':
            rows = _load_pickle_or_npy(path, suffix, allow_pickle)
        elif suffix == '.jsonl':
            rows = _load_jsonl(path)
        elif suffix == '.json':
            with open(path, encoding='utf-8') as f:
                rows = json.load(f)
        elif suffix == '.parquet':
            rows = _load_parquet(path)
        else:
            raise DataError(f"metadata {path}: unknown format {suffix!r}; valid: "
                            f"{', '.join(SAFE_SUFFIXES + PICKLE_SUFFIXES)}")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 -- truncated pickle, bad JSON, not UTF-8, ...
        raise DataError(f"metadata {path}: cannot read it as {suffix} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}); expected "
                        f"{SCHEMAS.get(kind, 'records')}") from None
    if isinstance(rows, np.ndarray) and rows.dtype.names:
        rows = [dict(zip(rows.dtype.names, r)) for r in rows.tolist()]
    if not isinstance(rows, (list, tuple, np.ndarray)) or len(rows) == 0:
        raise DataError(f"metadata {path}: expected a non-empty list of records, got "
                        f"{_describe(rows)}; expected {SCHEMAS.get(kind, 'records')}")
    kind = kind or infer_kind(rows[0], path)
    return records_from_rows(rows, kind, path)


def infer_kind(row, path):
    if isinstance(row, dict):
        if 'image_name' in row:
            return 'cc12m'
        if 'image_id' in row and 'captions' in row:
            return 'cc3m'
        if 'index' in row and ('title' in row or 'description' in row):
            return 'yfcc15m'
    elif isinstance(row, (tuple, list, np.ndarray)) and len(row) == 3:
        return 'yfcc15m'
    raise DataError(f"metadata {path}: cannot tell the format from its first record "
                    f"{_describe(row)}; expected one of: " + '; '.join(f'{k}: {v}' for k, v in SCHEMAS.items()))


def records_from_rows(rows, kind, path):
    """Python records (tuples / dicts) -> Records, checking their structure."""
    parse = {'yfcc15m': _yfcc_row, 'cc3m': _cc_row('image_id'), 'cc12m': _cc_row('image_name')}[kind]
    if parse(rows[0]) is None:
        raise DataError(f"{kind} metadata {path}: wrong structure, first record is "
                        f"{_describe(rows[0])}; expected {SCHEMAS[kind]}")
    keys, captions, bad = [], [], []
    for i, row in enumerate(rows):
        parsed = parse(row)
        if parsed is None:
            bad.append(i)
            parsed = (-1 if kind == 'yfcc15m' else '', [])
        keys.append(parsed[0])
        captions.append(parsed[1])
    if bad:
        warnings.warn(f"{kind} metadata {path}: {len(bad)} of {len(rows)} records are malformed "
                      f"(first: #{bad[0]} {_describe(rows[bad[0]])}); they are skipped as bad_record")
    return build_records(kind, keys, captions, len(bad))


def _yfcc_row(row):
    if isinstance(row, dict):
        row = (row.get('index'), row.get('title'), row.get('description'))
    if not isinstance(row, (tuple, list, np.ndarray)) or len(row) != 3:
        return None
    index = row[0]
    if isinstance(index, str) and index.isdigit():
        index = int(index)
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        return None
    return int(index), [row[1], row[2]]


def _cc_row(path_key):
    def parse(row):
        if not isinstance(row, dict) or path_key not in row or 'captions' not in row:
            return None
        path = row[path_key]
        if isinstance(path, (int, np.integer)):
            path = str(path)
        if not isinstance(path, str) or not path:
            return None
        caps = row['captions']
        caps = list(caps) if isinstance(caps, (list, tuple, np.ndarray)) else [caps]
        return path, caps
    return parse


def _load_npz(path, kind):
    try:
        with np.load(path, allow_pickle=False) as z:
            got = str(z['kind'])
            if kind is not None and got != kind:
                raise DataError(f"metadata {path} holds {got} records, not {kind}; "
                                f"use --dataset {got} or the right --metadata")
            keys = z['keys'] if 'keys' in z else StringColumn(z['key_blob'], z['key_offsets'])
            return Records(got, keys, StringColumn(z['text_blob'], z['text_offsets']), z['starts'])
    except DataError:
        raise
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"metadata {path}: not a make_dataset.py .npz ({e}); expected arrays "
                        f"kind, keys or key_blob/key_offsets, text_blob, text_offsets, starts") from None


def _load_pickle_or_npy(path, suffix, allow_pickle):
    if suffix == '.npy':
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as e:
            if 'allow_pickle' not in str(e):
                raise DataError(f"metadata {path}: not a NumPy array ({e})") from None
    convert = f"convert it once with `python make_dataset.py convert {path} OUT.npz --allow-pickle`"
    if suffix == '.npy':
        require_pickle_allowed(path, allow_pickle, convert)
        return np.load(path, allow_pickle=True)
    return load_pickle(path, allow_pickle, convert)


def require_pickle_allowed(path, allow_pickle, convert):
    """A pickle runs code when loaded: refuse it without --allow-pickle, warn with it."""
    if not allow_pickle:
        raise DataError(f"metadata {path} is a pickle (loading it can run arbitrary code): pass "
                        f"--allow-pickle if you trust it, or {convert}")
    warnings.warn(f"loading pickled metadata {path} (--allow-pickle): this can run code; {convert}")


def load_pickle(path, allow_pickle, convert):
    """A trusted pickle (see require_pickle_allowed); `convert` says how to avoid pickles."""
    require_pickle_allowed(path, allow_pickle, convert)
    with open(path, 'rb') as f:
        return pickle.load(f)


def _load_jsonl(path):
    rows = []
    with open(path, encoding='utf-8', errors='surrogateescape') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"metadata {path} line {n}: not JSON ({e.msg}); expected one "
                                f"record object per line") from None
    return rows


def _load_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"metadata {path}: reading Parquet needs pyarrow (pip install pyarrow), "
                        f"or convert it to .jsonl / .npz") from None
    return pq.read_table(path).to_pylist()


def _describe(x):
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + '...'

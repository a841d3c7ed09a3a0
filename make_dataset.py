"""Build training metadata in a safe format (no pickle): NumPy .npz (compact, read with
allow_pickle=False) or JSONL.

    # YFCC15M: the downloaded photo ids x OpenAI's captioned subset, captions from YFCC100M
    python make_dataset.py yfcc15m --ids flickr_unique_ids.npy \\
        --subset yfcc100m_subset_data.tsv --yfcc100m yfcc100m_dataset.txt --out yfcc15m.npz

    # convert upstream pickles (yfcc15m.pkl, cc3m.npy, cc12m.npy) once, then train without them
    python make_dataset.py convert cc3m.npy cc3m.npz --allow-pickle

Inputs of `yfcc15m`: `flickr_unique_ids.npy` (YFCC100M line numbers of the images you have),
OpenAI's `yfcc100m_subset_data.tsv` (line number, photo id, hash of the 14.8 M captioned
photos) and the YFCC100M metadata `yfcc100m_dataset.txt` (tab-separated; column 0 the line
number, 8 the title, 9 the description, URL-encoded). `.bz2` inputs are read as they are.
Captions are URL-decoded, HTML tags, entities and URLs removed, white space folded; photos
with neither title nor description left are dropped (counted).
"""
import argparse
import bz2
import html
import json
import os
import re
import sys
from urllib.parse import unquote_plus

import numpy as np

from metadata import DataError, build_records, load_records

TAG = re.compile(r'<[^<>]*>')
URL = re.compile(r'(?:https?://|www\.)\S+')
SPACE = re.compile(r'\s+')
CHUNK = 1_000_000


def clean_yfcc_text(raw):
    """A raw YFCC100M title/description -> clean text ('' when nothing is left)."""
    text = unquote_plus(raw)
    text = TAG.sub(' ', text)
    text = html.unescape(text)
    text = URL.sub(' ', text)
    return SPACE.sub(' ', text).strip()


def _open_text(path):
    if path.endswith('.bz2'):
        return bz2.open(path, 'rt', encoding='utf-8', errors='replace')
    return open(path, encoding='utf-8', errors='replace')


def _load_ids(path, allow_pickle):
    try:
        ids = np.load(path, allow_pickle=allow_pickle)
    except ValueError as e:
        raise DataError(f"{path}: {e}; pass --allow-pickle if you trust this file") from None
    return np.unique(np.asarray(ids).astype(np.int64).ravel())


def _subset_lines(path):
    """OpenAI's subset list -> sorted int64 YFCC100M line numbers (first column)."""
    lines = []
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            first = line.split('\t', 1)[0].strip()
            if not first:
                continue
            if not first.isdigit():
                if n == 1:
                    continue                      # a header row
                raise DataError(f"{path} line {n}: first column {first!r} is not a line number; "
                                f"expected OpenAI's yfcc100m_subset_data.tsv (line number, photo id, hash)")
            lines.append(int(first))
    return np.unique(np.asarray(lines, np.int64))


def build_yfcc15m(ids_path, subset_path, yfcc100m_path, allow_pickle=False, log=print):
    """-> Records of (index, [title, description]) for the downloaded, captioned photos."""
    have = _load_ids(ids_path, allow_pickle)
    wanted = np.intersect1d(have, _subset_lines(subset_path))
    log(f"{len(have)} downloaded ids, {len(wanted)} of them in OpenAI's captioned subset")
    keys, captions, empty = [], [], 0

    def flush(rows):
        nonlocal empty
        index = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        for keep in np.flatnonzero(np.isin(index, wanted, assume_unique=False)):
            cols = rows[keep][1]
            title = clean_yfcc_text(cols[8]) if len(cols) > 8 else ''
            desc = clean_yfcc_text(cols[9]) if len(cols) > 9 else ''
            if not title and not desc:
                empty += 1
                continue
            keys.append(int(index[keep]))
            captions.append([title, desc])

    rows = []
    with _open_text(yfcc100m_path) as f:
        for n, line in enumerate(f, 1):
            cols = line.rstrip('\n').split('\t')
            if not cols[0].isdigit():
                raise DataError(f"{yfcc100m_path} line {n}: column 0 {cols[0][:20]!r} is not a line "
                                f"number; expected the YFCC100M metadata TSV (yfcc100m_dataset)")
            rows.append((int(cols[0]), cols))
            if len(rows) == CHUNK:
                flush(rows)
                rows = []
    if rows:
        flush(rows)
    log(f"{len(keys)} photos with a title and/or description; {empty} dropped (both empty)")
    return build_records('yfcc15m', keys, captions)


def write(records, out):
    """`.npz` (compact, safe) or `.jsonl` (one record per line, upstream field names)."""
    if out.endswith('.npz'):
        records.save(out)
    elif out.endswith('.jsonl'):
        with open(out, 'w', encoding='utf-8', errors='surrogatepass') as f:
            for i in range(len(records)):
                f.write(json.dumps(_row(records, i), ensure_ascii=False) + '\n')
    else:
        raise DataError(f"output {out!r}: use a .npz or .jsonl name")


def _row(records, i):
    from decode import NONE_CAPTION
    caps = [None if c == NONE_CAPTION else c for c in records.captions(i)]
    if records.kind == 'yfcc15m':
        return {'index': records.key(i), 'title': caps[0], 'description': caps[1]}
    path_key = 'image_name' if records.kind == 'cc12m' else 'image_id'
    return {path_key: records.key(i), 'captions': caps}


def get_parser():
    parser = argparse.ArgumentParser('make_dataset.py', description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    y = sub.add_parser('yfcc15m', help='build YFCC15M metadata')
    y.add_argument('--ids', required=True, help='flickr_unique_ids.npy: YFCC100M line numbers you downloaded')
    y.add_argument('--subset', required=True, help="OpenAI's yfcc100m_subset_data.tsv[.bz2]")
    y.add_argument('--yfcc100m', required=True, help='YFCC100M metadata yfcc100m_dataset.txt[.bz2]')
    y.add_argument('--out', required=True, help='yfcc15m.npz (or .jsonl)')
    y.add_argument('--allow-pickle', action='store_true', help='--ids is a pickled object array')
    c = sub.add_parser('convert', help='convert metadata (pickle/npy/jsonl/json/parquet) to .npz or .jsonl')
    c.add_argument('src', help='yfcc15m.pkl, cc3m.npy, cc12m.npy, *.jsonl, ...')
    c.add_argument('dst', help='OUT.npz or OUT.jsonl')
    c.add_argument('--kind', choices=['yfcc15m', 'cc3m', 'cc12m'], default=None,
                   help='record schema (default: inferred from the first record)')
    c.add_argument('--allow-pickle', action='store_true', help='read a pickle / object .npy (runs code)')
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        if args.command == 'yfcc15m':
            records = build_yfcc15m(args.ids, args.subset, args.yfcc100m, args.allow_pickle)
        else:
            records = load_records(args.src, args.kind, args.allow_pickle)
        write(records, args.dst if args.command == 'convert' else args.out)
    except DataError as e:
        sys.exit(f"make_dataset.py: error: {e}")
    out = args.dst if args.command == 'convert' else args.out
    print(f"wrote {len(records)} {records.kind} records to {out} ({os.path.getsize(out) / 1e6:.1f} MB)")
    return records


if __name__ == '__main__':
    main()

"""Checkpoints: atomic (rotated) writes, a content digest that travels inside the file, verified
reads, and the one loader that turns a checkpoint into a model.

Our checkpoint dicts (main.py, finetune_classification.py, interop.py import) carry
`digest`: the SHA-256 of a canonical serialisation of every other entry (tensors by dtype,
shape and raw bytes, plain values by a stable encoding, dict keys in a stable order). It is
computed at save and checked after every `torch.load(weights_only=True)`, so a truncated or
bit-flipped file is refused wherever it is loaded, also after a copy to another machine.
Files written before digests existed still load: verified by the `checkpoint.pt.json` record
(size and SHA-256 of the good versions) that the earlier code wrote beside them, when it is
there, otherwise loaded with a one-line note. Files meant for other programs (interop.py's
OpenCLIP export) are written by save_atomic as they are, without a digest.
"""
import hashlib
import json
import os
import re

import torch

import model_ema
import models
import utils

DIGEST_KEY = 'digest'
DIGEST_SCHEME = 'sha256-v1'          # the canonical serialisation below; bump it if it changes
FINETUNE_KIND = 'finetune_classification'        # `kind` of finetune_classification.py's checkpoints
MODEL_KEYS = ('model', 'model_name', 'args')     # what load_model needs


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, ...); the previous ones are intact."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, unreadable, corrupted, or not the kind asked for."""


# ----------------------------------------------------------------------------- digests

def content_digest(obj):
    """'sha256-v1:<hex>' of a canonical serialisation of `obj` (what torch.load gives back)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return f'{DIGEST_SCHEME}:{h.hexdigest()}'


def _feed(h, x):
    """Every value as a tag, a length and its bytes, so that no two values encode alike."""
    if torch.is_tensor(x):
        t = x.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        _put(h, b't', f'{x.dtype}{tuple(x.shape)}'.encode())
        h.update(t.view(torch.uint8).numpy())          # raw bytes: bf16 and bool included
    elif isinstance(x, dict):
        _put(h, b'd', str(len(x)).encode())
        for key, value in sorted(((_hash_of(k), v) for k, v in x.items()), key=lambda kv: kv[0]):
            h.update(key)                              # keys ordered by content: str and int alike
            _feed(h, value)
    elif isinstance(x, (list, tuple)):                 # torch.Size included
        _put(h, b'l', str(len(x)).encode())
        for v in x:
            _feed(h, v)
    elif isinstance(x, (set, frozenset)):
        _put(h, b'e', b''.join(sorted(_hash_of(v) for v in x)))
    else:
        _put(h, *_scalar(x))


def _scalar(x):
    if x is None:
        return b'n', b''
    if isinstance(x, bool):
        return b'b', b'1' if x else b'0'
    if isinstance(x, int):
        return b'i', str(x).encode()
    if isinstance(x, float):
        return b'f', x.hex().encode()                  # exact, nan and inf included
    if isinstance(x, complex):
        return b'c', f'{x.real.hex()},{x.imag.hex()}'.encode()
    if isinstance(x, str):
        return b's', x.encode('utf-8', 'surrogatepass')
    if isinstance(x, (bytes, bytearray)):
        return b'y', bytes(x)
    if isinstance(x, (torch.dtype, torch.device)):
        return b'o', str(x).encode()
    raise TypeError(f"a checkpoint cannot hold a {type(x).__name__} (not weights_only-loadable)")


def _put(h, tag, payload):
    h.update(tag + len(payload).to_bytes(8, 'little') + payload)


def _hash_of(x):
    h = hashlib.sha256()
    _feed(h, x)
    return h.digest()


def file_sha256(path, chunk=1 << 20):
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def file_digest(path):
    """{'size', 'sha256'} of a file: an entry of the checkpoint.pt.json record of earlier versions."""
    return {'size': os.path.getsize(path), 'sha256': file_sha256(path)}


# ----------------------------------------------------------------------------- writing

def save(ckpt, path, keep=1):
    """Write one of our checkpoint dicts with its digest, atomically, as `path`; the previous
    `keep - 1` versions shift to path.1, path.2 ... Each file is complete before its first rename
    and verifies on its own, so a kill at any moment leaves every version usable or absent. A
    failed write (e.g. ENOSPC) leaves every earlier version as it was: CheckpointWriteError."""
    body = {k: v for k, v in ckpt.items() if k != DIGEST_KEY}
    tmp = _write_temp({**body, DIGEST_KEY: content_digest(body)}, path)
    paths = rotated_paths(path, max(1, keep))
    for older, newer in zip(reversed(paths[1:]), reversed(paths[:-1])):   # .1 -> .2, path -> .1
        if os.path.exists(newer):
            os.replace(newer, older)
    os.replace(tmp, path)


def save_on_master(ckpt, path, keep=1):
    if utils.is_main_process():
        save(ckpt, path, keep)


def save_atomic(obj, path):
    """torch.save `obj` as it is (files for other programs: no digest added) to a temp file in
    the same directory, fsync, then os.replace; a failed write: CheckpointWriteError, `path` intact."""
    os.replace(_write_temp(obj, path), path)


def _write_temp(obj, path):
    """torch.save to path.tmp.<pid>, flushed to disk -> the temp path. On any failure the partial
    temp file is removed (a full disk stays usable) and CheckpointWriteError names the cause:
    torch.save reports a full disk as a RuntimeError whose context is the OSError."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, Exception):         # KeyboardInterrupt, SystemExit: as they are
            raise
        raise CheckpointWriteError(f"could not write checkpoint {path}: {_os_reason(e)}; "
                                   f"the previous checkpoint is intact") from None


def _os_reason(e):
    """The OSError behind `e` (its strerror, e.g. 'No space left on device'), else e's first line."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def rotated_paths(path, keep):
    """checkpoint.pt, checkpoint.1.pt, ... : the newest first, `keep` of them."""
    stem, ext = os.path.splitext(path)
    return [path] + [f'{stem}.{i}{ext}' for i in range(1, keep)]


def remove_stale_temporaries(folder):
    """Delete `*.tmp.<pid>` files left by a process killed inside an atomic write."""
    for name in os.listdir(folder):
        if '.tmp.' in name and name.rsplit('.tmp.', 1)[1].isdigit():
            os.remove(os.path.join(folder, name))


# ----------------------------------------------------------------------------- reading

def load_checkpoint(path, map_location='cpu'):
    """torch.load(weights_only=True) and verify -> the object (our dicts without `digest`).
    CheckpointError (one line) if it is missing, unsafe, truncated or corrupted."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a torch file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot load checkpoint {path} safely (corrupted or truncated, or "
                              f"not a weights-only torch file): {first}") from None
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        _verify_digest(obj, path)
    else:
        _verify_legacy(obj, path)
    return obj


def _verify_digest(obj, path):
    stored = obj.pop(DIGEST_KEY)
    if not (isinstance(stored, str) and stored.startswith(DIGEST_SCHEME + ':')):
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated, or written by a newer "
                              f"version: its digest {str(stored)[:24]!r} is not {DIGEST_SCHEME}")
    if content_digest(obj) != stored:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated: its contents do not "
                              f"match the SHA-256 digest saved in it")


def _verify_legacy(obj, path):
    """A file without a digest: checked against the checkpoint.pt.json record the earlier
    code wrote, if there is one; one of our checkpoints without a record gets a note."""
    record, good = legacy_record(path)
    if good:
        if file_digest(path) not in good:
            raise CheckpointError(f"checkpoint {path} is corrupted or truncated (its size/SHA-256 "
                                  f"is not in {record})")
    elif isinstance(obj, dict) and ('model_name' in obj or 'kind' in obj):
        print(f"note: checkpoint {path} carries no digest (written before checkpoints did, and no "
              f"{os.path.basename(record)} beside it): loaded unverified")


def legacy_record(path):
    """(record path, [good {'size', 'sha256'}]) of the checkpoint.pt.json beside `path`
    (checkpoint.1.pt is listed in checkpoint.pt.json); [] if there is none."""
    rotated = re.fullmatch(r'(.*)\.\d+(\.[^./]*)', path)
    names = [f'{path}.json'] + ([f'{rotated[1]}{rotated[2]}.json'] if rotated else [])
    for record in names:
        try:
            with open(record) as f:
                good = [d for d in json.load(f).get('good', []) if isinstance(d, dict)]
        except (OSError, ValueError, AttributeError):
            continue
        if good:
            return record, good
    return names[0], []


def load_latest_good(path, keep):
    """The newest of path, path.1, ... that loads and verifies -> (checkpoint, file), or
    (None, None) if none exists. A bad newer file is reported with a warning and skipped."""
    for candidate in rotated_paths(path, max(1, keep)):
        if not os.path.isfile(candidate):
            continue
        try:
            return load_checkpoint(candidate), candidate
        except CheckpointError as e:
            print(f"warning: {e}; trying the previous one")
    return None, None


def describe(obj):
    """What a loaded file holds, in words (for errors that say what to pass instead)."""
    if not isinstance(obj, dict):
        return f"a pickled {type(obj).__name__}"
    if obj.get('kind') == FINETUNE_KIND:
        return "a fine-tuned classifier (finetune_classification.py)"
    if all(k in obj for k in MODEL_KEYS):
        if 'optimizer' in obj and 'state' in obj:
            return f"a main.py training checkpoint of {obj['model_name']}"
        return f"a {obj['model_name']} model without optimizer or training state (e.g. interop.py import)"
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        return f"a plain state dict ({len(obj)} tensors)"
    return f"a dict with keys {', '.join(sorted(map(str, obj))[:6]) or '(none)'}"


def load_model_checkpoint(path, flag='--resume', use_ema=False):
    """A verified checkpoint with a model to build (main.py's or interop.py import's);
    CheckpointError (one line) for anything else. use_ema: its `model` is the EMA weights
    (main.py --model-ema), which every reader of the checkpoint then uses."""
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and ckpt.get('kind') == FINETUNE_KIND:
        raise CheckpointError(f"{flag} {path}: a fine-tuned classifier (finetune_classification.py); "
                              f"{flag} takes a pre-training checkpoint written by main.py")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{flag} {path}: not a checkpoint written by main.py (a {type(ckpt).__name__})")
    missing = [k for k in MODEL_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{flag} {path}: not a checkpoint written by main.py (no {', '.join(missing)})")
    models.parse_model_name(ckpt['model_name'])
    if use_ema:
        try:
            ckpt = dict(ckpt, model=model_ema.weights_of(ckpt, f"{flag} {path}"))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    return ckpt


def load_model(path_or_ckpt, image_size=None, device='cpu'):
    """The model of a checkpoint (a path, or a dict from load_model_checkpoint), built from its
    `model_name` and `args` for `image_size` (default: the training size; ViT position
    embeddings resampled), weights loaded, in eval mode."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_model_checkpoint(path_or_ckpt)
    flags = dict(ckpt['args'], image_size=image_size or ckpt['args']['image_size'])
    model = models.create_model_from_flags(ckpt['model_name'], flags)
    model.load_state_dict(models.resample_position_embeddings(model, ckpt['model']))
    return model.to(device).eval()

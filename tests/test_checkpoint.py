"""Checkpoint integrity: the digest saved in every checkpoint is checked by every loader
(main.py --resume / --finetune, eval_zeroshot, eval_linear, demo_zeroshot,
finetune_classification, interop), automatic resume falls back past a damaged file without
any side record, files of the earlier format still load, and main.py --resume says what a
file it cannot resume is."""
import json
import os
import shutil
import struct
import zipfile

import pytest
import torch
from PIL import Image

import checkpoint
import demo_zeroshot
import eval_linear
import eval_zeroshot
import finetune_classification
import interop
import main as train
import models
from test_main import TINY


@pytest.fixture(scope='module')
def split_run(tmp_path_factory):
    """A one-epoch run stopped after 4 steps and resumed: checkpoint.pt holds step 8,
    checkpoint.1.pt step 4."""
    out = tmp_path_factory.mktemp('split') / 'run'
    train.main([*TINY, '--epochs', '1', '--output-dir', str(out), '--exit-after-steps', '4'])
    train.main([*TINY, '--epochs', '1', '--output-dir', str(out)])
    return out


def flip_tensor_byte(path):
    """Flip one bit in the middle of the largest tensor's bytes (the zip entry data/N)."""
    with zipfile.ZipFile(path) as z:
        entry = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(entry.header_offset + 26)
        name_len, extra_len = struct.unpack('<HH', f.read(4))
        where = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2 + 3
        f.seek(where)
        byte = f.read(1)[0]
        f.seek(where)
        f.write(bytes([byte ^ 0x40]))


def copy(src, dst):
    shutil.copy(src, dst)
    return str(dst)


def one_line_message(call, capsys):
    """Run `call`, which must refuse: -> its one-line message (SystemExit text, argparse's
    stderr line or the exception's text)."""
    with pytest.raises((SystemExit, ValueError)) as e:
        call()
    err = capsys.readouterr().err.strip()
    if isinstance(e.value, SystemExit):
        message = e.value.code if isinstance(e.value.code, str) else err
    else:
        message = str(e.value)
    assert message and len(message.strip().splitlines()) == 1, message
    return message


def _image(tmp_path):
    Image.new('RGB', (16, 16), (255, 0, 0)).save(tmp_path / 'red.png')
    return str(tmp_path / 'red.png')


LOADERS = {
    'main --resume': lambda p, t: train.main([*TINY, '--epochs', '1', '--output-dir', str(t / 'o'),
                                              '--resume', p, '--evaluate']),
    'main --finetune': lambda p, t: train.main([*TINY, '--epochs', '1', '--output-dir', str(t / 'o'),
                                                '--finetune', p, '--evaluate']),
    'eval_zeroshot': lambda p, t: eval_zeroshot.main(['--resume', p, '--datasets', 'shapes',
                                                      '--output-dir', str(t / 'zs'), '--no-cache']),
    'clip_benchmark loader': lambda p, t: eval_zeroshot.load_for_clip_benchmark('z', p),
    'eval_linear': lambda p, t: eval_linear.main(['--resume', p, '--dataset', 'shapes', '--shapes-num-train',
                                                  '100', '--wd-grid', '1e-2', '--max-iter', '5']),
    'demo_zeroshot': lambda p, t: demo_zeroshot.main(['--checkpoint', p, '--img-path', _image(t),
                                                      '--classes', 'circle,square']),
    'finetune_classification': lambda p, t: finetune_classification.main(
        ['--pretrained', p, '--train-dir', str(t), '--val-dir', str(t), '--output-dir', str(t / 'ft')]),
    'interop export': lambda p, t: interop.main(['export', '--checkpoint', p, '--out', str(t / 'exported')]),
    'checkpoint.load_model': lambda p, t: checkpoint.load_model(p),
}


@pytest.mark.parametrize('loader', list(LOADERS))
def test_flipped_bytes_are_refused_by_every_loader(split_run, tmp_path, loader, capsys):
    path = copy(split_run / 'checkpoint.pt', tmp_path / 'flipped.pt')
    flip_tensor_byte(path)
    assert torch.load(path, weights_only=True)['step'] == 8        # torch itself loads it silently
    message = one_line_message(lambda: LOADERS[loader](path, tmp_path), capsys)
    assert 'corrupted' in message and 'flipped.pt' in message, message


def test_truncated_file_to_resume_is_one_line(split_run, tmp_path, capsys):
    path = copy(split_run / 'checkpoint.pt', tmp_path / 'cut.pt')
    os.truncate(path, os.path.getsize(path) // 2)
    message = one_line_message(lambda: LOADERS['main --resume'](path, tmp_path), capsys)
    assert message.startswith('main.py: error: --resume:') and 'corrupted or truncated' in message


def test_auto_resume_without_record_falls_back_past_a_damaged_newest(split_run, tmp_path, capsys):
    out = tmp_path / 'run'
    shutil.copytree(split_run, out)
    for name in os.listdir(out):                     # no side record: only the files themselves
        if name.endswith('.json') and name.startswith('checkpoint'):
            os.remove(out / name)
    flip_tensor_byte(out / 'checkpoint.pt')
    capsys.readouterr()
    train.main([*TINY, '--epochs', '1', '--output-dir', str(out)])   # resumes at step 4, redoes 5-8
    printed = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoint.pt'} is corrupted" in printed and 'trying the previous one' in printed
    assert f"resumed from {out / 'checkpoint.1.pt'}: epoch 0, step 4" in printed
    redone = checkpoint.load_checkpoint(str(out / 'checkpoint.pt'))
    first = checkpoint.load_checkpoint(str(split_run / 'checkpoint.pt'))
    assert redone['step'] == first['step'] == 8
    for key, value in first['model'].items():        # the same steps again: the same weights
        assert torch.equal(value, redone['model'][key]), key


def write_like_the_earlier_code(ckpt, path, keep=2):
    """What utils.save_rotating wrote before digests travelled in the file: the dict as it is,
    and path.json listing the size and SHA-256 of every good version."""
    torch.save(ckpt, path)
    record = f'{path}.json'
    good = json.load(open(record))['good'] if os.path.exists(record) else []
    good = [d for d in good if d != checkpoint.file_digest(path)][-keep:] + [checkpoint.file_digest(path)]
    with open(record, 'w') as f:
        json.dump({'good': good}, f, indent=1)


@pytest.fixture
def legacy_run(split_run, tmp_path):
    """split_run's checkpoint.pt rewritten in the earlier format (no digest, checkpoint.pt.json)."""
    out = tmp_path / 'legacy'
    out.mkdir()
    ckpt = checkpoint.load_checkpoint(str(split_run / 'checkpoint.pt'))
    write_like_the_earlier_code(ckpt, str(out / 'checkpoint.pt'))
    assert 'digest' not in torch.load(out / 'checkpoint.pt', weights_only=True)
    return out, ckpt


def test_checkpoint_of_the_earlier_format_still_resumes_verified(legacy_run, capsys):
    out, ckpt = legacy_run
    train.main([*TINY, '--epochs', '1', '--output-dir', str(out), '--evaluate'])
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoint.pt'}: epoch 1, step 8" in printed and 'note:' not in printed
    model = checkpoint.load_model(str(out / 'checkpoint.pt'))       # every loader reads it
    for key, value in ckpt['model'].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_checkpoint_of_the_earlier_format_is_verified_by_its_record(legacy_run, capsys):
    out, _ = legacy_run
    flip_tensor_byte(out / 'checkpoint.pt')
    message = one_line_message(lambda: checkpoint.load_checkpoint(str(out / 'checkpoint.pt')), capsys)
    assert 'corrupted' in message and 'checkpoint.pt.json' in message


def test_checkpoint_of_the_earlier_format_without_record_loads_with_a_note(legacy_run, capsys):
    out, ckpt = legacy_run
    moved = copy(out / 'checkpoint.pt', out.parent / 'elsewhere.pt')   # copied without its record
    assert checkpoint.load_checkpoint(moved)['step'] == ckpt['step']
    assert 'carries no digest' in capsys.readouterr().out


def test_digest_covers_every_entry_and_is_stable(tmp_path):
    ckpt = {'model': {'w': torch.arange(6, dtype=torch.bfloat16).view(2, 3), 'b': torch.zeros(2, dtype=torch.bool)},
            'optimizer': {'state': {0: {'step': torch.tensor(3.0)}, 1: {}},
                          'param_groups': [{'lr': 0.1, 'params': [0, 1]}]},
            'args': {'betas': [0.9, 0.98], 'name': 'x', 'nothing': None}, 'epoch': 2}
    path = str(tmp_path / 'c.pt')
    checkpoint.save(ckpt, path)
    assert checkpoint.load_checkpoint(path).keys() == ckpt.keys()         # the digest is not handed on
    reordered = {'epoch': 2, 'args': ckpt['args'], 'optimizer': ckpt['optimizer'], 'model': ckpt['model']}
    assert checkpoint.content_digest(reordered) == checkpoint.content_digest(ckpt)
    for change in [lambda c: c['model']['w'].view(torch.int16).__setitem__((0, 0), 1),   # one bf16 bit
                   lambda c: c['optimizer']['state'].update({2: c['optimizer']['state'].pop(1)}),  # an int key
                   lambda c: c['args'].update(betas=[0.9, 0.99]),
                   lambda c: c.update(epoch=2.0)]:
        changed = torch.load(path, weights_only=True)
        stored = changed.pop('digest')
        change(changed)
        assert checkpoint.content_digest(changed) != stored


# ----------------------------------------------------------------------------- not a main.py checkpoint

def _imported(path):
    model = models.create_model('CLIP_TINYCNN_CLIP')
    interop.save_ours(str(path), model, 'CLIP_TINYCNN_CLIP', {}, {'from': 'test'})
    return str(path)


@pytest.mark.parametrize('kind, what, instead', [
    ('imported', 'a CLIP_TINYCNN_CLIP model without optimizer or training state (e.g. interop.py import)',
     'to train from its weights pass --finetune'),
    ('state_dict', 'a plain state dict', 'to train from its weights pass --finetune'),
    ('list', 'a pickled list', 'pass a checkpoint.pt written by main.py'),
    ('finetuned', 'a fine-tuned classifier', 'resume it with finetune_classification.py --resume'),
])
def test_resume_of_a_file_that_is_no_training_checkpoint_says_what_it_is(tmp_path, kind, what, instead, capsys):
    path = str(tmp_path / f'{kind}.pt')
    if kind == 'imported':
        _imported(path)
    elif kind == 'state_dict':
        torch.save(models.create_model('CLIP_TINYCNN_CLIP').state_dict(), path)
    elif kind == 'list':
        torch.save([torch.zeros(2), 3], path)
    else:
        checkpoint.save({'kind': checkpoint.FINETUNE_KIND, 'model': {}, 'model_name': 'CLIP_TINYCNN_CLIP',
                         'args': {}}, path)
    message = one_line_message(lambda: LOADERS['main --resume'](path, tmp_path), capsys)
    assert message.startswith(f'main.py: error: {path} is {what}') and instead in message, message


def test_imported_model_and_plain_state_dict_train_with_finetune(tmp_path, capsys):
    state = str(tmp_path / 'state.pt')
    torch.save(models.create_model('CLIP_TINYCNN_CLIP').state_dict(), state)
    for path in (_imported(tmp_path / 'imported.pt'), state):
        train.main([*TINY, '--epochs', '1', '--output-dir', str(tmp_path / 'o'), '--finetune', path,
                    '--evaluate'])
        assert f'fine-tuning from {path}: ' in capsys.readouterr().out
    torch.save([1, 2], tmp_path / 'list.pt')
    message = one_line_message(lambda: LOADERS['main --finetune'](str(tmp_path / 'list.pt'), tmp_path), capsys)
    assert 'a pickled list' in message


def test_a_directory_named_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / 'run'
    (out / 'checkpoint.pt').mkdir(parents=True)
    message = one_line_message(lambda: train.main([*TINY, '--epochs', '1', '--output-dir', str(out)]), capsys)
    assert f"{out / 'checkpoint.pt'} is not a file" in message
    message = one_line_message(lambda: LOADERS['main --resume'](str(out / 'checkpoint.pt'), tmp_path), capsys)
    assert 'is a directory' in message


def test_openclip_export_stays_a_plain_state_dict(tmp_path):
    model = models.create_model('CLIP_TINYVIT_CLIP')
    interop.save_ours(str(tmp_path / 'ours.pt'), model, 'CLIP_TINYVIT_CLIP', {}, {'from': 'test'})
    assert 'digest' in torch.load(tmp_path / 'ours.pt', weights_only=True)    # ours: verified
    interop.main(['export', '--checkpoint', str(tmp_path / 'ours.pt'), '--out', str(tmp_path / 'oc')])
    exported = torch.load(tmp_path / 'oc' / 'open_clip_pytorch_model.bin', weights_only=True)
    assert 'digest' not in exported and all(torch.is_tensor(v) for v in exported.values())

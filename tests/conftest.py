"""Shared test setup: the repo root on sys.path, no network, small shared fixtures."""
import functools
import os
import tempfile
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ['WANDB_MODE'] = 'offline'          # never let a test reach for the network
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='vlp-test-cache-')   # eval caches stay out of ~


@pytest.fixture(scope='session')
def tokenizer():
    import datasets
    return datasets.Tokenizer()


@pytest.fixture(scope='session')
def wordpiece(tmp_path_factory):
    """A local tokenizer directory as a copy of bert-base-uncased holds it (vocab.txt,
    tokenizer.json, tokenizer_config.json), with a tiny WordPiece vocabulary: every word of
    `shapes`' captions, class names and templates, the tests' captions, digits (CLIPA's text
    tower reads such a directory)."""
    import re
    from transformers import BertTokenizerFast
    import shapes
    words = set(shapes.caption_vocabulary())
    for text in shapes.TEMPLATES + list(shapes.CLASSNAMES) + ['a photo of a cat', 'a diagram of a red square',
                                                               'a view of a thing number x', *'0123456789']:
        words |= set(re.findall(r'[a-z0-9]+', text.lower().replace('{}', ' ')))
    d = tmp_path_factory.mktemp('wordpiece')
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *sorted(words), *'.,-']
    (d / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    BertTokenizerFast(str(d / 'vocab.txt'), do_lower_case=True).save_pretrained(str(d))
    return str(d)


def text_tokenizer_of(model, tokenizer, wordpiece):
    """The tokenizer the model's text tower reads: CLIPA presets a WordPiece vocabulary."""
    import text
    if model.text_cfg.hf_tokenizer:
        return text.LocalHFTokenizer(wordpiece, model.text_cfg.context_length)
    return tokenizer


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models and problems: one thread avoids thread-pool contention on a shared CPU."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HUGE_TOWER = 4e8    # image-tower parameters above which the model tests train 2 of its blocks


def shallow_if_huge(monkeypatch, backbone):
    """Register `backbone` with its image tower cut to 2 blocks when it has over HUGE_TOWER
    parameters (ViT-H/14, ViT-bigG/14: 0.6-1.8 B; the tests check the per-block structure, which
    2 blocks have, and 7-20 GB of weights and gradients do not fit a shared CPU test)."""
    from dataclasses import replace
    import models
    cfg = models.BACKBONES[backbone]
    if cfg.is_vit and tower_parameters(backbone) > HUGE_TOWER:     # (a ResNet has no `depth`: whole)
        register_backbone(monkeypatch, backbone, replace(cfg, timm_kwargs={**cfg.timm_kwargs, 'depth': 2}))


def register_backbone(monkeypatch, name, cfg):
    """models.BACKBONES with `name` -> `cfg` for this test only (a copy of the registry)."""
    import models
    import utils
    registry = utils.Registry('backbone')
    registry.update(models.BACKBONES)
    registry[name] = cfg
    monkeypatch.setattr(models, 'BACKBONES', registry)


def unzero_norms(model):
    """Give zero-initialised residual norms (timm ResNet's last BN per block) non-zero scales,
    so that one backward pass reaches every parameter."""
    import torch
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            torch.nn.init.normal_(m.weight, 1.0, 0.1)


def params_without_grad(model):
    """Trainable parameters whose gradient is missing, all zero or not finite."""
    import torch
    return [n for n, p in model.named_parameters() if p.requires_grad and
            (p.grad is None or p.grad.abs().sum() == 0 or not torch.isfinite(p.grad).all())]


@functools.lru_cache(maxsize=None)
def tower_parameters(backbone):
    """Parameters of a registered backbone's image tower, counted on the meta device (no memory)."""
    import torch
    import models
    with torch.device('meta'):
        return sum(p.numel() for p in models.build_image_tower(models.BACKBONES[backbone], 64).parameters())


# ------------------------------------------------------------ what `make setup` installs
# A test that needs WordNet, a C++ compiler or a local Slurm says so with
# @pytest.mark.needs('wordnet' | 'cxx') (tests/test_slurm.py calls missing_setup itself). When the
# machine lacks it the test skips with one line naming the command to run, and the run ends with
# a line listing every such skip; under CI=true it fails instead, so CI cannot go green without it.
SETUP_SKIP = 'missing setup: '


@functools.lru_cache(maxsize=None)
def _wordnet_missing():
    import augment
    try:
        augment.require_wordnet()
    except ValueError:
        return "needs NLTK's WordNet: run `make setup` (or `python tools/setup_wordnet.py`)"


@functools.lru_cache(maxsize=None)
def _cxx_missing():
    import shutil
    import main
    if not any(shutil.which(c) for c in main.CXX_COMPILERS):
        return 'needs a C++ compiler for torch.compile: as root run `bash tools/setup_system.sh` (apt-get install g++)'


NEEDS = {'wordnet': _wordnet_missing, 'cxx': _cxx_missing}


def missing_setup(reason):
    """Skip the running test for missing set-up (`reason` names the command); fail under CI=true."""
    if os.environ.get('CI') == 'true':
        pytest.fail(f'{SETUP_SKIP}{reason} (CI=true: CI must run this test)', pytrace=False)
    pytest.skip(SETUP_SKIP + reason)


def pytest_configure(config):
    config.addinivalue_line('markers', "needs(what): the test needs set-up `make setup` installs: "
                            + ', '.join(NEEDS))


def pytest_runtest_setup(item):
    for marker in item.iter_markers('needs'):
        reason = NEEDS[marker.args[0]]()
        if reason:
            missing_setup(reason)


def pytest_terminal_summary(terminalreporter):
    # printed just above pytest's short summary and closing line (which CI reads), not after them
    reasons = {}
    for report in terminalreporter.stats.get('skipped', []):
        message = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if SETUP_SKIP in message:
            reason = message.split(SETUP_SKIP, 1)[1]
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in reasons.items():
        terminalreporter.write_line(f'{n} test(s) skipped for missing set-up: {reason}', yellow=True)

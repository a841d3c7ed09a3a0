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

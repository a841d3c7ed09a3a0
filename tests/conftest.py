"""Shared test setup: the repo root on sys.path, no network, small shared fixtures."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ['WANDB_MODE'] = 'offline'          # never let a test reach for the network
os.environ.setdefault('HF_HUB_OFFLINE', '1')


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

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

"""The README tells the truth: its two commands exist, every training flag is documented,
and every flag in its flag table exists."""
import os
import re

import main as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, 'README.md')).read()


def _main_flags():
    return {s for a in train.get_args_parser()._actions for s in a.option_strings if s.startswith('--')}


def test_commands_exist():
    makefile = open(os.path.join(ROOT, 'Makefile')).read()
    for target in ('demo', 'test'):
        assert f'make {target}' in README
        assert re.search(rf'^{target}:', makefile, re.M)
    assert 'make test' in open(os.path.join(ROOT, '.ci', 'run')).read()


def test_every_training_flag_is_documented():
    missing = sorted(f for f in _main_flags() if f'`{f}' not in README and f'{f}`' not in README)
    assert not missing, f'flags missing from README: {missing}'


def test_flag_table_lists_only_real_flags():
    section = README.split('## Command-line flags')[1].split('\n## ')[0]
    table = [line for line in section.splitlines() if line.startswith('| `--')]
    documented = {f for line in table for f in re.findall(r'`(--[a-z0-9-]+)', line.split('|')[1])}
    assert documented and documented <= _main_flags(), sorted(documented - _main_flags())

"""The docs tell the truth: the README's two commands exist, every flag of every command-line
tool is in its flag table and every flag in a table exists, the model-zoo and method tables are
what tools/zoo_table.py prints from the registries, and every link and file path in README.md,
docs/*.md and bench/RESULTS.md points at something in the repository."""
import argparse
import glob
import os
import re
import subprocess
import sys

import pytest

import main as train
import methods
import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, 'README.md')).read()
DOC_FILES = ['README.md', *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md'))),
             'bench/RESULTS.md']


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def long_flags(parser, exclude=()):
    """Option strings of each documented-worthy action: [{'--a', '--alias'}, ...]."""
    actions = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():                   # subcommands (interop, make_dataset)
                actions += long_flags(sub, exclude)
            continue
        names = {s for s in a.option_strings if s.startswith('--')} - {'--help'}
        if names and not names & set(exclude):
            actions.append(names)
    return actions


def markdown_sections(text, title_fragment):
    """Bodies of the sections whose heading contains title_fragment (up to the next heading of
    the same or a higher level)."""
    lines, out = text.split('\n'), []
    for i, line in enumerate(lines):
        m = re.match(r'(#+) ', line)
        if m and title_fragment in line:
            body = []
            for later in lines[i + 1:]:
                h = re.match(r'(#+) ', later)
                if h and len(h.group(1)) <= len(m.group(1)):
                    break
                body.append(later)
            out.append('\n'.join(body))
    return out


def table_flags(section):
    """`--flags` in the first column of the section's table rows."""
    return {f for line in section.splitlines() if line.startswith('| `-')
            for f in re.findall(r'`(--[A-Za-z0-9_-]+)', line.split('|')[1])}


def test_commands_exist():
    makefile = read('Makefile')
    for target in ('demo', 'test'):
        assert f'make {target}' in README
        assert re.search(rf'^{target}:', makefile, re.M)
    assert 'make test' in read('.ci/run')


def _main_table():
    sections = markdown_sections(read('docs/flags.md'), '`main.py` flags')
    assert sections, 'docs/flags.md has no "`main.py` flags" section'
    return table_flags(sections[0])


def test_every_training_flag_is_in_the_flag_table():
    missing = sorted(f for names in long_flags(train.get_args_parser()) for f in names
                     if f not in _main_table())
    assert not missing, f'main.py flags missing from docs/flags.md: {missing}'


def test_flag_table_lists_only_real_flags():
    real = {f for names in long_flags(train.get_args_parser()) for f in names}
    documented = _main_table()
    assert documented and documented <= real, sorted(documented - real)


def _cli_parsers():
    import demo_zeroshot
    import eval_linear
    import eval_zeroshot
    import finetune_classification
    import interop
    import make_dataset
    import run_with_submitit
    main_flags = [f for names in long_flags(train.get_args_parser()) for f in names]
    return {  # tool -> (its flags, less the main.py flags it inherits; the doc holding its table)
        'eval_zeroshot.py': (long_flags(eval_zeroshot.get_args_parser()), 'docs/evaluation.md'),
        'demo_zeroshot.py': (long_flags(demo_zeroshot.get_args_parser()), 'docs/evaluation.md'),
        'eval_linear.py': (long_flags(eval_linear.get_args_parser()), 'docs/evaluation.md'),
        'finetune_classification.py': (long_flags(finetune_classification.get_args_parser()),
                                       'docs/evaluation.md'),
        'interop.py': (long_flags(interop.get_args_parser()), 'docs/interop.md'),
        'make_dataset.py': (long_flags(make_dataset.get_parser()), 'docs/data.md'),
        'run_with_submitit.py': (long_flags(run_with_submitit.get_args_parser(), exclude=main_flags),
                                 'docs/scale-out.md'),
    }


@pytest.mark.parametrize('tool', ['eval_zeroshot.py', 'demo_zeroshot.py', 'eval_linear.py',
                                  'finetune_classification.py', 'interop.py', 'make_dataset.py',
                                  'run_with_submitit.py'])
def test_each_tool_has_a_flag_table_that_matches_its_parser(tool):
    actions, doc = _cli_parsers()[tool]
    sections = markdown_sections(read(doc), f'`{tool}` flags')
    assert sections, f'{doc} has no "`{tool}` flags" section'
    documented = set().union(*(table_flags(s) for s in sections))
    real = set().union(*actions)
    assert documented <= real, f'{doc}: {tool} has no {sorted(documented - real)}'
    missing = sorted(min(names) for names in actions if not names & documented)
    assert not missing, f'{tool} flags missing from its table in {doc}: {missing}'


# ----------------------------------------------------------------- the model-zoo table

def _readme_zoo_rows():
    section = markdown_sections(README, 'Model zoo')[0]
    return [line for line in section.splitlines() if line.startswith('| `')]


def test_zoo_table_lists_every_backbone_with_its_timm_model_and_size():
    rows = _readme_zoo_rows()
    listed = [re.match(r'\| `(\w+)` \| (\S+) \| (\d+) \|', row).groups() for row in rows]
    expected = [(name, cfg.tower_name, str(cfg.image_size))
                for name, cfg in models.BACKBONES.items()]
    assert listed == expected


@pytest.mark.slow
def test_zoo_table_is_what_zoo_table_py_prints():
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'zoo_table.py')], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    printed = [line for line in out.splitlines() if line.startswith('| `')]
    assert printed == _readme_zoo_rows()


# ----------------------------------------------------------------- links and file paths

def slug(heading):
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def anchors(path):
    text = re.sub(r'```.*?```', '', read(path), flags=re.S)
    return {slug(m) for m in re.findall(r'^#+ (.*)$', text, re.M)}


def _targets(path):
    """(kind, target) of every relative link and backticked repository path in a doc file."""
    text = re.sub(r'```.*?```', '', read(path), flags=re.S)                 # code blocks: commands
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if not re.match(r'[a-z]+:', target):
            yield 'link', target
    top = set(os.listdir(ROOT)) - SKIP_DIRS
    for token in re.findall(r'`([^`\s]+)`', text):
        token = token.split('::')[0].rstrip('/,')
        first = token.split('/')[0]
        if '/' in token and first in top and not re.search(r'[*<>{}$]', token):
            yield 'path', token                                            # e.g. tools/zoo_table.py
        elif '/' not in token and re.fullmatch(r'[\w.-]+\.(py|sh|md)', token):
            yield 'file', token                                            # e.g. main.py


SKIP_DIRS = {'.git', '.venv', '__pycache__', '.pytest_cache', 'output', 'wandb'}   # not the repository's


def _repo_basenames():
    names = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        names.update(filenames)
    return names


@pytest.mark.parametrize('doc', DOC_FILES)
def test_links_and_paths_point_into_the_repository(doc):
    basenames, broken = _repo_basenames(), []
    for kind, target in _targets(doc):
        if kind == 'link':
            path, _, anchor = target.partition('#')
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else \
                os.path.join(ROOT, doc)
            if not os.path.exists(full):
                broken.append(f'link {target}: no such file')
            elif anchor and full.endswith('.md') and anchor not in anchors(os.path.relpath(full, ROOT)):
                broken.append(f'link {target}: no such heading')
        elif kind == 'path' and not os.path.exists(os.path.join(ROOT, target)):
            broken.append(f'`{target}`: not in the repository')
        elif kind == 'file' and target not in basenames:
            broken.append(f'`{target}`: no such file in the repository')
    assert not broken, f'{doc}: ' + '; '.join(broken)


def test_no_file_names_a_document_users_do_not_have():
    # the names are split so that this file does not name them either
    banned = [n + '.md' for n in ('ENVIRON' + 'MENT', 'RELIA' + 'BILITY', 'UPSTREAM' + '_CLI',
                                  'DES' + 'IGN', 'STY' + 'LE')] + ['../' + 'shared']
    hits = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            path = os.path.relpath(os.path.join(dirpath, name), ROOT)
            if path == os.path.relpath(__file__, ROOT):
                continue
            try:
                text = read(path)
            except UnicodeDecodeError:                                   # images, checkpoints
                continue
            hits += [f'{path}: {n}' for n in banned if n in text]
    assert not hits, hits


def test_method_table_is_the_registry():
    """docs/zoo.md's method table is `python tools/zoo_table.py --methods` (methods.markdown_table)."""
    assert methods.markdown_table() in read('docs/zoo.md'), \
        'paste the output of `python tools/zoo_table.py --methods` into docs/zoo.md'


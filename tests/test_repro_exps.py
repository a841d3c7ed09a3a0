"""repro_exps.txt: every command line parses with the real parser of its script (comma sweeps
expanded as run.sh expands them), the file covers the paper's recipe table, and each distinct
training recipe trains two optimizer steps on tiny data in its dataset's on-disk format with
its own flags; one zero-shot evaluation line runs on a checkpoint written by a recipe.

    python -m pytest -q tests/test_repro_exps.py -m "not slow"         # parse + coverage, fast
    python -m pytest -q tests/test_repro_exps.py                       # + smoke runs (slow)
    REPRO_SMOKE=all python -m pytest -q tests/test_repro_exps.py       # smoke every recipe

Size overrides in the smoke runs (nothing else changes; the rest of the flags are the recipe's):
--image-size 32 (--multicrop-resize scaled by the same factor when the recipe sets it),
--batch-size 4, --epochs 1, --exit-after-steps 2, --workers 0, --print-freq 1 (a log line per
step), --output-dir (run.sh's, $EXP_ROOT/NAME/$SHA/JOBNAME); the Slurm flags are dropped. $DATA
and $EVAL_DATA point at temporary directories holding tiny data at the recipes' own paths, so
--root / --metadata / --eval-data-root are the recipes' own.
"""
import contextlib
import copy
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import time

import pytest
import torch

import datagen
import eval_zeroshot
import main as train
import run_with_submitit
import utils
import zeroshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPRO = os.path.join(ROOT, 'repro_exps.txt')
SCRIPTS = ('run_with_submitit.py', 'eval_zeroshot.py')
VARIABLES = ('DATA', 'EVAL_DATA', 'EXP_ROOT', 'SHA')
SHA = 'abc1234'                      # $SHA: the commit the training ran at (any short id)

# The paper's recipe table (upstream clip-rocket's repro_exps.txt; docs/zoo.md, "Paper recipes"):
# (dataset, model) -> resolved values the line must give, and the sweep it must run.
CL2L_TABLE = {
    ('cc3m', 'CL2L_R50_CL2L'): (dict(wd=0.5, label_smoothing=0.1, transformer_layers=6,
                                     text_dropout_prob=0.2, loss_avg_or_sum='avg'),
                                dict(seed={0, 50})),
    ('cc12m', 'CL2L_R50_CL2L'): (dict(text_dropout_prob=0.05, loss_avg_or_sum='sum',
                                      label_smoothing=0.1), dict(seed={0, 10, 50})),
    ('yfcc15m', 'CL2L_R50_CL2L'): (dict(remove_stopwords_prob=0.9, text_dropout_prob=0.0,
                                        clean_before_augment=True, loss_avg_or_sum='sum',
                                        label_smoothing=0.1), dict(seed={0, 10, 50})),
    ('yfcc15m', 'CL2L_VITS16MOCO_CL2L'): (dict(clean_before_augment=True, loss_avg_or_sum='sum',
                                               label_smoothing=0.1, checkpoint_grad=True),
                                          dict(epochs={25, 32}, seed={0, 10, 50})),
    ('yfcc15m', 'CL2L_VITB16_CL2L'): (dict(clean_before_augment=True, loss_avg_or_sum='sum',
                                           label_smoothing=0.1, checkpoint_grad=True),
                                      dict(epochs={25, 32})),
    ('merged', 'CL2L_R50_CL2L'): (dict(caption_sampling='multi', lr=2e-3, multicrop_resize=192,
                                       clean_before_augment=True, loss_avg_or_sum='sum',
                                       label_smoothing=0.1), {}),
}
# Non-contrastive runs: YFCC15M (R50; ViT-S with --separate-proj-child), CC3M and CC12M (R50).
NON_CONTRASTIVE = ('BARLIP', 'BYOLIP', 'SIAMLIP', 'SWALIP')
NC_PAIRS = {(d, f'CL2L_{b}_{m}') for m in NON_CONTRASTIVE
            for d, b in (('yfcc15m', 'R50'), ('yfcc15m', 'VITS16MOCO'), ('cc3m', 'R50'), ('cc12m', 'R50'))}
BASELINES = {('cc3m', 'CLIP_R50_CLIP'), ('cc12m', 'CLIP_R50_CLIP'), ('yfcc15m', 'CLIP_R50_CLIP'),
             ('yfcc15m', 'CLIP_VITB16_CLIP')}
METHODS = {'CL2L', 'BARLIP', 'SIAMLIP', 'BYOLIP', 'SWALIP'}

# cvnets' RangeAugment CLIP recipe: its own scale (32 nodes x 8 GPUs x 256, 12 epochs), data
# (tarpairs archives) and training features
CVNETS_RECIPE = 'rangeaugment-CLIP_VITB16CV_CLIP'
CVNETS_VALUES = dict(dataset='tarpairs', nodes=32, ngpus=8, batch_size=256, epochs=12, lr=5e-4,
                     wd=0.2, eps=1e-6, weak_min_scale=0.9, embed_dim=512, checkpoint_grad=True,
                     range_augment=True, multiscale=True, multiscale_sizes=[160, 192, 224, 256, 288, 320],
                     model_ema=True, model_ema_decay=0.9995, zeroshot_datasets=['imagenet'])

# Smoke runs by default (REPRO_SMOKE=all runs all 27 recipes, ~1.7x as long): every model name
# of the file and every dataset format at least once. Each other recipe differs from a default
# run of the same model only in values (wd, label smoothing, dropout, text layers, stop-word
# probability, sum/avg), in the dataset format, or in flags that other default runs exercise
# (--clean-before-augment, --checkpoint-grad); its flags still go through the real parsers in
# test_every_line_parses.
SMOKE_DEFAULT = {
    'cc3m-CL2L_R50_CL2L',              # cc3m .npy, 6 text layers, text dropout, loss avg
    'cc12m-CL2L_R50_CL2L',             # cc12m .npy
    'yfcc15m-CL2L_R50_CL2L',           # yfcc zip tree + .pkl, cleaning; its checkpoint is evaluated
    'merged-CL2L_R50_CL2L',            # three roots, multi caption sampling, smaller views
    'yfcc15m-CL2L_VITS16MOCO_CL2L',
    'yfcc15m-CL2L_VITB16_CL2L',
    'cc3m-CL2L_R50_BARLIP',
    'cc3m-CL2L_R50_BYOLIP',
    'cc12m-CL2L_R50_SIAMLIP',
    'cc3m-CL2L_R50_SWALIP',
    'yfcc15m-CL2L_VITS16MOCO_BARLIP',  # --separate-proj-child, per method
    'yfcc15m-CL2L_VITS16MOCO_BYOLIP',
    'yfcc15m-CL2L_VITS16MOCO_SIAMLIP',
    'yfcc15m-CL2L_VITS16MOCO_SWALIP',
    'cc3m-CLIP_R50_CLIP',
    'yfcc15m-CLIP_VITB16_CLIP',
    'yfcc15m-CLIPA_VITB16_CLIP',       # CLIPA: low resolution, syntax text reduction
    CVNETS_RECIPE,                     # tarpairs, RangeAugment, multi-scale, model EMA
}
# recipes that start from another recipe's checkpoint (--finetune): parsed like every line, not
# smoke-run here (their input is a real pre-training result); the pre-train -> fine-tune chain
# itself runs in tests/test_clipa.py
FINETUNE_RECIPES = {'yfcc15m-CLIPA_VITB16_CLIP_ft224'}
CLIPA_RECIPES = {'yfcc15m-CLIPA_VITB16_CLIP', *FINETUNE_RECIPES}
EVAL_RECIPE = 'yfcc15m-CL2L_R50_CL2L'
SMOKE_SIZE = 32
LOSS_TERM = {'CLIP': 'clip_loss', 'CL2L': 'clip_loss', 'BARLIP': 'barlip_loss',
             'SIAMLIP': 'siamlip_loss', 'BYOLIP': 'siamlip_loss', 'SWALIP': 'swalip_loss'}


# ----------------------------------------------------------------------------- reading the file

def logical_lines(text):
    """(first line number, command) per command: '#' comments and blank lines dropped, lines
    ending in a backslash joined with the next one (as the shell does)."""
    out, parts, start = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        if not parts and (not line.strip() or line.lstrip().startswith('#')):
            continue
        assert not line.lstrip().startswith('#'), f"line {number}: a comment inside a continued command"
        start = start or number
        if line.rstrip().endswith('\\'):
            parts.append(line.rstrip()[:-1])
            continue
        out.append((start, ' '.join(parts + [line]).strip()))
        parts, start = [], None
    assert not parts, f"line {start}: the file ends inside a continued command"
    return out


def substitute(command, env):
    """$NAME / ${NAME} -> env[NAME]; an unknown variable is an error."""
    def repl(m):
        name = m.group(1) or m.group(2)
        assert name in env, f"unknown shell variable ${name} (known: {', '.join(env)})"
        return env[name]
    return re.sub(r'\$(?:\{(\w+)\}|(\w+))', repl, command)


def split_command(command):
    """'./run.sh [--local] [--nproc N] NAME SCRIPT flags...' -> dict."""
    tokens = shlex.split(command)
    assert tokens[0] == './run.sh', f"not a run.sh line: {command[:60]}"
    i, local, nproc = 1, False, None
    while tokens[i].startswith('--'):
        if tokens[i] == '--local':
            local, i = True, i + 1
        elif tokens[i] == '--nproc':
            nproc, i = int(tokens[i + 1]), i + 2
        else:
            raise AssertionError(f"unknown run.sh option {tokens[i]}")
    name, script, flags = tokens[i], tokens[i + 1], tokens[i + 2:]
    assert script in SCRIPTS, f"{name}: script {script} not one of {SCRIPTS}"
    return dict(name=name, script=script, flags=flags, local=local, nproc=nproc)


def expand(flags):
    """run.sh's sweep: every comma-separated flag value is an axis of a Cartesian product.
    -> [(flags, {option: value})] in product order."""
    axes, option = [], None
    for i, token in enumerate(flags):
        if token.startswith('--'):
            option = token
        elif ',' in token:
            axes.append((i, option, token.split(',')))
    jobs = []
    for values in itertools.product(*[vals for _, _, vals in axes]):
        job = list(flags)
        for (i, _, _), value in zip(axes, values):
            job[i] = value
        jobs.append((job, {opt: v for (_, opt, _), v in zip(axes, values)}))
    return jobs


def job_name(name, point):
    """run.sh's name of a sweep point: NAME + _<flag><value> per comma-swept flag, characters
    outside [A-Za-z0-9._+-] replaced by '-'."""
    return name + ''.join('_' + re.sub(r'[^A-Za-z0-9._+-]', '-', option.lstrip('-') + value)
                          for option, value in point.items())


def job_dir(env, name, point):
    """The --output-dir run.sh gives a training job of commit $SHA."""
    return os.path.join(env['EXP_ROOT'], name, env['SHA'], job_name(name, point))


def commands(env):
    with open(REPRO, encoding='utf-8') as f:
        text = f.read()
    out = []
    for number, command in logical_lines(text):
        c = split_command(substitute(command, env))
        c['line'] = number
        out.append(c)
    return out


# ----------------------------------------------------------------------------- real parsers

def _parse_quietly(parse):
    """Run parse(); a parser error (SystemExit) or a ValueError -> (None, its one-line message)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(), None
    except SystemExit:
        return None, err.getvalue().strip() or 'SystemExit'
    except ValueError as e:
        return None, f'ValueError: {e}'


def parse_training(flags):
    """run_with_submitit's parser, then main.resolve_args (model names, method combos, values,
    files); run_with_submitit.check_args too when the launcher has it (Slurm flags)."""
    def parse():
        args = run_with_submitit.get_args_parser().parse_args(flags)
        if hasattr(run_with_submitit, 'check_args'):
            run_with_submitit.check_args(copy.deepcopy(args))
        resolved = copy.deepcopy(args)
        train.resolve_args(resolved)
        return resolved
    return _parse_quietly(parse)


def parse_eval(flags):
    def parse():
        parser = utils.OneLineErrorParser('eval_zeroshot.py', parents=[eval_zeroshot.get_args_parser()])
        args = parser.parse_args(flags)
        catalog = zeroshot.load_catalog(args.catalog, args.labels, args.templates)[0]
        args.dataset_names = zeroshot.expand_names(args.datasets, catalog)
        return args
    return _parse_quietly(parse)


def slurm_options():
    """Option strings of the launcher's own (Slurm) flags -> takes a value?"""
    own = {a.dest for a in train.get_args_parser()._actions}
    return {s: a.nargs != 0 for a in run_with_submitit.get_args_parser()._actions
            if a.dest not in own and a.dest != 'help' for s in a.option_strings}


# ----------------------------------------------------------------------------- fixtures

def make_env(root):
    """$DATA, $EVAL_DATA (with ImageNet's folder: training validates on it), $EXP_ROOT, $SHA."""
    env = {v: str(root / v.lower()) for v in VARIABLES if v != 'SHA'}
    env['SHA'] = SHA
    os.makedirs(os.path.join(env['EVAL_DATA'], 'imagenet', 'val'))
    os.makedirs(env['DATA'])
    os.makedirs(env['EXP_ROOT'])
    return env


def placeholder_env(root):
    """make_env + empty metadata files at the recipes' paths (the parser checks they exist)."""
    env = make_env(root)
    for meta in ('cc3m.npy', 'cc12m.npy', 'yfcc15m.pkl', 'rangeaugment/metadata.pkl'):
        os.makedirs(os.path.dirname(os.path.join(env['DATA'], meta)), exist_ok=True)
        open(os.path.join(env['DATA'], meta), 'w').close()
    return env


@pytest.fixture(scope='module')
def parsed(tmp_path_factory):
    """Every expanded job of the file: dict(command, job flags, sweep point, args or error)."""
    env = placeholder_env(tmp_path_factory.mktemp('placeholders'))
    jobs = []
    for c in commands(env):                 # --finetune CKPT: the earlier job's checkpoint
        for flag, value in zip(c['flags'], c['flags'][1:]):
            if flag == '--finetune':
                os.makedirs(os.path.dirname(value), exist_ok=True)
                open(value, 'w').close()
    for c in commands(env):
        for flags, point in expand(c['flags']):
            parse = parse_training if c['script'] == 'run_with_submitit.py' else parse_eval
            args, error = parse(flags)
            jobs.append(dict(c, job=flags, point=point, args=args, error=error))
    return env, jobs


# ----------------------------------------------------------------------------- fast tests

def test_file_form(parsed):
    env, jobs = parsed
    lines = {j['name']: j for j in jobs}
    names = [c['name'] for c in commands(env)]
    assert len(names) == len(set(names)), 'NAMEs must be unique'
    for c in lines.values():
        if c['script'] == 'run_with_submitit.py':        # Slurm jobs, not --local
            assert not c['local'] and c['nproc'] is None, c['name']
        else:
            assert c['local'], f"{c['name']}: evaluation runs --local"
    with open(REPRO, encoding='utf-8') as f:
        text = f.read()
    used = {v for _, c in logical_lines(text) for v in re.findall(r'\$\{?(\w+)', c)}
    assert used == set(VARIABLES), used
    header = hardware = 0                 # every group states its hardware above its commands
    starts = {number for number, _ in logical_lines(text)}
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(('# ---', '# ===')):
            header = number
        elif line.startswith('# hardware:'):
            hardware = number
        elif number in starts:
            assert hardware > header, f"line {number}: no '# hardware:' comment in its group"


@pytest.mark.needs('wordnet')
def test_every_line_parses(parsed):
    _, jobs = parsed
    failures = [f"line {j['line']} {j['name']} {j['point']}: {j['error']}" for j in jobs if j['error']]
    assert not failures, '\n'.join(failures)
    train_jobs = [j for j in jobs if j['script'] == 'run_with_submitit.py']
    eval_jobs = [j for j in jobs if j['script'] == 'eval_zeroshot.py']
    assert len(train_jobs) >= 40 and len(eval_jobs) >= 20, (len(train_jobs), len(eval_jobs))


def _training(jobs):
    return [j for j in jobs if j['script'] == 'run_with_submitit.py' and j['args'] is not None]


@pytest.mark.needs('wordnet')
def test_covers_the_papers_recipes(parsed):
    _, jobs = parsed
    runs = _training(jobs)
    pairs = {(j['args'].dataset, j['args'].model) for j in runs}
    missing = (set(CL2L_TABLE) | NC_PAIRS | BASELINES) - pairs
    assert not missing, f"no line for {sorted(missing)}"
    assert METHODS <= {j['args'].method for j in runs}
    for j in runs:                                           # the paper's scale, every line
        a = j['args']
        if j['name'] == CVNETS_RECIPE:
            got = {k: getattr(a, k) for k in CVNETS_VALUES}
            assert got == CVNETS_VALUES, got
            continue
        assert (a.nodes, a.ngpus, a.batch_size) == (4, 8, 128), j['name']
        finetune = bool(a.finetune)                          # CLIPA's short full-resolution stage
        assert (a.epochs == 1 if finetune else a.epochs in (25, 32)), j['name']
        assert a.precision in ('amp', 'fp32'), j['name']
        assert a.zeroshot_datasets == ['imagenet'], j['name']
        if a.base == 'CL2L':
            assert a.separate_proj and a.text_augment and a.num_augs == 2, j['name']
    for (dataset, model), (values, sweep) in CL2L_TABLE.items():
        group = [j for j in runs if (j['args'].dataset, j['args'].model) == (dataset, model)]
        names = {j['name'] for j in group}
        assert len(names) == 1, (dataset, model, names)
        for j in group:
            got = {k: getattr(j['args'], k) for k in values}
            assert got == values, (j['name'], got)
        for key in ('seed', 'epochs'):
            expected = sweep.get(key, {0} if key == 'seed' else {32})
            assert {getattr(j['args'], key) for j in group} == expected, (j['name'], key)
        assert len(group) == math.prod(len(v) for v in sweep.values()), (j['name'], len(group))
    merged = [j['args'] for j in runs if j['args'].dataset == 'merged']
    assert all(len(a.root.split('---')) == len(a.metadata.split('---')) == 3 for a in merged)


def test_non_contrastive_and_baseline_flags(parsed):
    _, jobs = parsed
    for j in _training(jobs):
        a, name = j['args'], j['name']
        if a.method in NON_CONTRASTIVE:
            assert a.label_smoothing == (0.0 if a.method == 'SWALIP' else 0.1), j['name']
            assert a.separate_proj_child == (a.backbone == 'VITS16MOCO'), j['name']
            if a.dataset == 'yfcc15m':
                assert (a.clean_before_augment, a.loss_avg_or_sum, a.text_dropout_prob) == (True, 'sum', 0.0), name
            if a.dataset == 'cc3m':
                assert (a.wd, a.transformer_layers, a.text_dropout_prob, a.loss_avg_or_sum) == (0.5, 6, 0.2, 'avg'), name
            if a.dataset == 'cc12m':
                assert (a.text_dropout_prob, a.loss_avg_or_sum) == (0.1, 'sum'), j['name']
        if a.method == 'CLIP' and not a.finetune and name != CVNETS_RECIPE:   # plain CLIP: upstream's defaults
            assert (a.lr, a.wd, a.label_smoothing, a.loss_avg_or_sum) == (3e-3, 0.1, 0.0, 'avg'), j['name']


@pytest.mark.needs('wordnet')
def test_byolip_equals_the_upstream_siamlip_momentum_spelling(parsed):
    _, jobs = parsed
    byol = [j for j in _training(jobs) if j['args'].method == 'BYOLIP']
    assert byol
    for j in byol:
        i = j['job'].index('--model')
        upstream = [*j['job'][:i + 1], j['job'][i + 1].replace('_BYOLIP', '_SIAMLIP'), '--momentum',
                    *j['job'][i + 2:]]
        args, error = parse_training(upstream)
        assert error is None, error
        differs = {k for k in vars(args) if getattr(args, k) != getattr(j['args'], k)}
        assert differs == {'momentum'}, (j['name'], differs)      # the alias flag itself only


@pytest.mark.needs('wordnet')
def test_every_trained_model_is_evaluated(parsed):
    """Each training job's final checkpoint, at the path run.sh gives it, is on the evaluation
    line named eval-NAME; nothing else is."""
    env, jobs = parsed
    trained = {os.path.join(job_dir(env, j['name'], j['point']), 'checkpoint.pt'): j['name']
               for j in _training(jobs)}
    evaluated = {}
    for j in jobs:
        if j['script'] != 'eval_zeroshot.py':
            continue
        a = j['args']
        assert a.data_root == env['EVAL_DATA'] and 'imagenet' in a.dataset_names
        assert trained.get(a.resume) == j['name'][len('eval-'):], (j['name'], a.resume)
        evaluated[a.resume] = j['name']
    missing = sorted(set(trained) - set(evaluated))
    assert not missing, missing


# ----------------------------------------------------------------------------- smoke runs

def tiny_data(env, n=12):
    """Tiny data at the recipes' own paths, in the upstream formats: $DATA/cc3m + cc3m.npy,
    $DATA/cc12m + cc12m.npy, $DATA/yfcc100m (zip tree) + yfcc15m.pkl, and cvnets' tar archives
    with their pickled metadata dict at $DATA/rangeaugment (tarpairs)."""
    data = env['DATA']
    for kind, writer in (('cc3m', lambda r, s: datagen.write_cc(r, s, 'cc3m', 'npy')),
                         ('cc12m', lambda r, s: datagen.write_cc(r, s, 'cc12m', 'npy')),
                         ('yfcc100m', lambda r, s: datagen.write_yfcc(r, s, 'pkl'))):
        flags = writer(os.path.join(data, kind), datagen.specs(n_good=n, seed=len(kind)))
        meta = flags[flags.index('--metadata') + 1]
        os.replace(meta, os.path.join(data, os.path.basename(meta)))     # $DATA/<name>.npy|pkl
    datagen.write_tarpairs(os.path.join(data, 'rangeaugment'), datagen.specs(n_good=4 * n, seed=7),
                           per_archive=8, form='cvnets')     # batch 8: more than 2 steps


@pytest.fixture(scope='module')
def smoke_env(tmp_path_factory):
    """Tiny data at the recipes' paths; ImageNet's (empty) folder for the validation, which the
    runs never reach. Outputs (checkpoints of 1-3 GB) are deleted at the end."""
    root = tmp_path_factory.mktemp('smoke')
    env = make_env(root)
    tiny_data(env)
    yield env
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def smoke_threads():
    """One intra-op thread (REPRO_SMOKE_THREADS): the smoke runs' tensors are tiny, and on a
    busy 2-core machine two OpenMP threads ran them 2x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get('REPRO_SMOKE_THREADS', '1')))
    yield
    torch.set_num_threads(before)


def set_flag(flags, option, value):
    if option in flags:
        flags[flags.index(option) + 1] = value
    else:
        flags += [option, value]


def smoke_flags(job, env, output_dir):
    """The job's main.py flags with the Slurm flags dropped and the size flags overridden."""
    slurm = slurm_options()
    flags, i = [], 0
    while i < len(job):
        if job[i] in slurm:
            i += 2 if slurm[job[i]] else 1
            continue
        flags.append(job[i])
        i += 1
    if '--multicrop-resize' in flags:                        # keep the views/global size ratio
        model = flags[flags.index('--model') + 1]
        native = train.models.BACKBONES.get(train.models.parse_model_name(model)[1]).image_size
        mc = int(flags[flags.index('--multicrop-resize') + 1])
        set_flag(flags, '--multicrop-resize', str(max(8, round(SMOKE_SIZE * mc / native / 8) * 8)))
    batch = '8' if '--multiscale' in flags else '4'          # >= 2 images at the largest size
    for option, value in (('--image-size', str(SMOKE_SIZE)), ('--batch-size', batch), ('--epochs', '1'),
                          ('--exit-after-steps', '2'), ('--workers', '0'), ('--print-freq', '1'),
                          ('--output-dir', output_dir)):
        set_flag(flags, option, value)
    return flags


OVERRIDDEN = {'image_size', 'multicrop_resize', 'batch_size', 'epochs', 'exit_after_steps',
              'workers', 'print_freq', 'output_dir', 'steps_per_epoch', 'multiscale_sizes'}


def training_recipes(env):
    """Distinct training recipes: expanded jobs deduplicated by everything but seed/epochs
    (the first point kept) -> {NAME: (job flags, sweep point)}."""
    recipes, seen = {}, set()
    for c in commands(env):
        if c['script'] != 'run_with_submitit.py':
            continue
        for flags, point in expand(c['flags']):
            key = tuple(t for t, kept in zip(flags, _not_sweep(flags)) if kept)
            if key not in seen:
                seen.add(key)
                recipes.setdefault(c['name'], (flags, point))
    return recipes


def _not_sweep(flags):
    keep = [True] * len(flags)
    for i, t in enumerate(flags):
        if t in ('--seed', '--epochs'):
            keep[i] = keep[i + 1] = False
    return keep


def run_smoke(name, env):
    """Two optimizer steps of recipe NAME on the tiny data; checks; -> output dir."""
    job, point = training_recipes(env)[name]
    recipe_args, error = parse_training(job)
    assert error is None, error
    out = job_dir(env, name, point)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    result = train.main(smoke_flags(job, env, out))
    print(f"{name}: {time.time() - t0:.1f} s")
    assert result is None                                    # stopped by --exit-after-steps
    steps = [json.loads(line) for line in open(os.path.join(out, 'log_steps.txt'))]
    assert [s['step'] for s in steps] == [1, 2]
    for s in steps:
        assert LOSS_TERM[recipe_args.method] in s, sorted(s)
        bad = {k: v for k, v in s.items() if not math.isfinite(v)}
        assert not bad, bad
    ckpt = torch.load(os.path.join(out, 'checkpoint.pt'), map_location='cpu', weights_only=True, mmap=True)
    assert ckpt['step'] == 2 and ckpt['model_name'] == recipe_args.model
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    used = json.load(open(os.path.join(out, 'args.json')))   # the recipe's flags, but the sizes
    differs = {k: (used.get(k), v) for k, v in train.plain_args(recipe_args).items()
               if k in used and k not in OVERRIDDEN and used[k] != v}
    assert not differs, differs
    return out


def _smoke_params():
    env = {v: f'/{v.lower()}' for v in VARIABLES}
    names = list(training_recipes(env))
    everything = os.environ.get('REPRO_SMOKE') == 'all'
    def marks(n):
        if n in FINETUNE_RECIPES:
            return [pytest.mark.skip(reason='needs a pre-training checkpoint; the chain runs in test_clipa.py')]
        if everything or n in SMOKE_DEFAULT:
            return []
        return [pytest.mark.skip(reason='its model and its data format run in the default smoke set; '
                                        'REPRO_SMOKE=all runs it')]
    return [pytest.param(n, marks=[pytest.mark.slow, *marks(n)]) for n in names]


def test_smoke_default_set_is_current():
    names = set(training_recipes({v: f'/{v.lower()}' for v in VARIABLES}))
    assert SMOKE_DEFAULT <= names and EVAL_RECIPE in SMOKE_DEFAULT
    assert len(names) == len(CL2L_TABLE) + len(NC_PAIRS) + len(BASELINES) + len(CLIPA_RECIPES) + 1
    models = {n.split('-', 1)[1] for n in names - FINETUNE_RECIPES}
    assert models == {n.split('-', 1)[1] for n in SMOKE_DEFAULT}, 'every model runs by default'
    assert {n.split('-')[0] for n in SMOKE_DEFAULT} == {'cc3m', 'cc12m', 'yfcc15m', 'merged', 'rangeaugment'}


@pytest.mark.needs('wordnet')
@pytest.mark.parametrize('name', _smoke_params())
def test_recipe_trains_two_steps(name, smoke_env, smoke_threads):
    out = run_smoke(name, smoke_env)
    if name != EVAL_RECIPE:                                  # checkpoints of 1-3 GB: free the disk
        shutil.rmtree(out)


@pytest.mark.needs('wordnet')
@pytest.mark.slow
def test_eval_line_runs_on_a_recipe_checkpoint(smoke_env, smoke_threads, tmp_path):
    """The evaluation line that names EVAL_RECIPE's checkpoint, as written, with $EVAL_DATA an
    empty folder: the generated `shapes` entry is evaluated, every other entry is skipped."""
    job, point = training_recipes(smoke_env)[EVAL_RECIPE]
    target = os.path.join(job_dir(smoke_env, EVAL_RECIPE, point), 'checkpoint.pt')
    if not os.path.isfile(target):
        run_smoke(EVAL_RECIPE, smoke_env)
    env = dict(smoke_env, EVAL_DATA=str(tmp_path / 'no_eval_data'))
    os.makedirs(env['EVAL_DATA'])
    jobs = [flags for c in commands(env) if c['script'] == 'eval_zeroshot.py'
            for flags, point in expand(c['flags']) if point.get('--resume') == target]
    assert len(jobs) == 1
    flags = list(jobs[0])
    out = str(tmp_path / 'zeroshot')                         # run.sh gives the job one
    set_flag(flags, '--workers', '0')                        # size override: no loader processes
    set_flag(flags, '--output-dir', out)
    results = eval_zeroshot.main(flags)
    assert 0 <= results['shapes']['top1'] <= 100 and 'h_top1' in results['shapes']
    assert results['imagenet'] == {'skipped': results['imagenet']['skipped']}
    assert os.path.isfile(os.path.join(out, 'results.csv'))
    json_name = f'shapes_checkpoint_CL2L_R50_CL2L_{SMOKE_SIZE}px_zeroshot_classification.json'
    assert os.path.isfile(os.path.join(out, json_name))
    shutil.rmtree(os.path.dirname(target))

"""Property-based command-line tests (hypothesis): whatever the flags, `main.py` answers with a
parsed run or one line `main.py: error: ...`, never a traceback.

    python -m pytest -q tests/test_cli_property.py     # parse_args part ~5 s; main() part (slow) ~1-2 min

1. `main.parse_args(argv)` over generated argv lists -- valid and garbage model names,
   numeric flags with bad values (negative, zero, huge, NaN/inf, non-numbers), bad choices,
   unknown flags -- returns a Namespace or raises SystemExit(2) with exactly one stderr line.
2. No accepted float flag is NaN, and the step-size flags are finite too.
3. `main.main(argv)` on small accepted combinations (shapes, 64 samples, one step) trains or
   exits with a one-line error.
Examples are derandomized (`derandomize=True`), so CI runs the same cases every time.
"""
import contextlib
import io
import os
import tempfile
import traceback

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import datasets
import main as train
import models
import text_reduction

GARBAGE_MODELS = ['CLIP_FOO_CLIP', 'CL2L_R50', '', 'CLIP_R50_BARLIP', 'clip_tinycnn_clip', '_', '__',
                  'CLIP_TINYCNN_CLIP_X', ' CLIP_TINYCNN_CLIP', 'CL2L_TINYCNN_SIGLIP', 'CLIP\n_R50_CLIP']
INT_FLAGS = ['--batch-size', '--epochs', '--num-augs', '--update-freq', '--image-size', '--context-length',
             '--text-context', '--keep-checkpoints', '--shapes-num-train', '--workers', '--print-freq',
             '--eval-freq', '--train-num-samples', '--exit-after-steps', '--max-bad-steps',
             '--prefetch-factor', '--multicrop-resize', '--sk-iters', '--seed']
FLOAT_FLAGS = ['--lr', '--wd', '--label-smoothing', '--patch-dropout', '--warmup-epochs', '--lr-start',
               '--lr-end', '--momentum-tau', '--max-bad-fraction', '--logit-scale-init', '--eps']
CHOICE_FLAGS = {'--dataset': [*datasets.DATASETS, *datasets.aliases()], '--accum-mode': ['cached', 'simple'],
                '--text-reduction': list(text_reduction.MODES), '--precision': ['auto', 'fp32', 'amp', 'bf16'],
                '--caption-sampling': ['single', 'multi'], '--loss-avg-or-sum': ['avg', 'sum'],
                '--clip-proj-type': ['linear', 'mlp'], '--zeroshot-datasets': ['shapes']}
BAD_NUMBERS = ['-1', '0', '-0', '1', '1e308', '1e999', '-1e999', '9' * 30, '9' * 5000, 'nan', 'NaN', '-nan',
               'inf', '-inf', 'Infinity', 'abc', '', ' ', '1.5', '0x10', '1_000', '\u0663', '+2', '.5',
               '3.', '1e-320', '--', '-', '=', '1\n2', 'None']
UNKNOWN_FLAGS = ['--foo', '--batchsize', '--lr-max', '--model-name', '-x', '-J', '---lr', '--', '-',
                 '--epochs-', '--dataset_name', '--image_size']
TINY_MODELS = models.list_models('*TINY*')

numbers = st.one_of(st.integers(-2, 100).map(str), st.sampled_from(BAD_NUMBERS),
                    st.integers(-10**6, 10**6).map(str), st.floats(0, 1).map(repr),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr))
free_text = st.text(max_size=12)                 # any unicode, newlines included


@st.composite
def argvs(draw):
    """An argv list: flags in any order, each `--flag value` or `--flag=value`."""
    pairs = []
    if draw(st.booleans()):
        pairs.append(('--model', draw(st.one_of(st.sampled_from(models.list_models() + GARBAGE_MODELS),
                                                free_text))))
    for flag in draw(st.lists(st.sampled_from(INT_FLAGS + FLOAT_FLAGS), max_size=5, unique=True)):
        pairs.append((flag, draw(numbers)))
    for flag in draw(st.lists(st.sampled_from(sorted(CHOICE_FLAGS)), max_size=2, unique=True)):
        valid = draw(st.integers(0, 3)) > 0                 # mostly a valid choice
        pairs.append((flag, draw(st.sampled_from(CHOICE_FLAGS[flag]) if valid else free_text)))
    argv = []
    for flag, value in draw(st.permutations(pairs)):
        argv += [f'{flag}={value}'] if draw(st.booleans()) else [flag, value]
    unknown = st.one_of(st.sampled_from(UNKNOWN_FLAGS), st.from_regex(r'--[a-z][a-z0-9_-]{0,10}', fullmatch=True))
    for flag in draw(st.lists(unknown, max_size=2)) if draw(st.integers(0, 3)) == 0 else []:
        if flag == '-h' or (len(flag) > 2 and '--help'.startswith(flag)):
            continue                            # --help prints the help and exits 0, by design
        argv.insert(draw(st.integers(0, len(argv))), flag)
    return argv


def one_line_error(err, prog='main.py'):
    """The captured stderr is exactly one line `PROG: error: ...`."""
    text = err.getvalue()
    return text.startswith(f'{prog}: error:') and text.endswith('\n') and text.count('\n') == 1


# ----------------------------------------------------------------------------- 1. parse_args

@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(argvs())
@example(['--model', ''])
@example(['--model', 'CLIP_FOO_CLIP', '--batch-size', 'nan'])
@example(['--model', 'CL2L_R50', '--epochs', '-1'])
@example(['--lr'])
@example(['--batch-size', '9' * 5000])
@example(['--precision', 'amp', '--dataset', 'nope', '--unknown-flag'])
@example(['--epochs=--'])                      # argparse alone gives epochs=[]
@example(['--momentum-tau=--'])
def test_parse_args_returns_namespace_or_one_line_error(argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = train.parse_args(argv)
    except SystemExit as e:
        assert e.code == 2 and one_line_error(err), (argv, e.code, err.getvalue())
        return
    except Exception as e:  # noqa: BLE001  (the property: nothing but SystemExit escapes)
        pytest.fail(f"parse_args({argv!r}) raised {''.join(traceback.format_exception(e))}")
    assert err.getvalue() == '', (argv, err.getvalue())
    assert args.model in models.list_models(), (argv, args.model)


# ----------------------------------------------------------------------------- 2. non-finite

FLOAT_OPTIONS = sorted(a.option_strings[-1] for a in train.get_args_parser()._actions
                       if a.type is float and a.nargs is None)
SIGLIP_ONLY = {'--logit-bias-init'}
STEP_FLAGS = ['--lr', '--wd', '--lr-start', '--lr-end', '--warmup-epochs', '--eps']


def _accepts(argv):
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            train.parse_args(argv)
    except SystemExit:
        return False
    return True


def test_non_finite_numbers_are_rejected():
    """NaN is never a meaningful value of a float flag, nor is an infinite learning rate,
    weight decay, warm-up or epsilon: they stop at parse time with one line (an accepted
    --lr nan crashes in torch.optim.AdamW; --wd nan trains NaN weights)."""
    accepted = [[flag, 'nan'] for flag in FLOAT_OPTIONS
                if _accepts([*(['--model', 'CLIP_TINYCNN_SIGLIP'] if flag in SIGLIP_ONLY else []), flag, 'nan'])]
    accepted += [[flag, v] for flag in STEP_FLAGS for v in ('inf', '-inf', '1e999') if _accepts([f'{flag}={v}'])]
    assert not accepted, f"{len(accepted)} non-finite values accepted: {accepted}"


# ----------------------------------------------------------------------------- 3. main()

SMALL = ['--shapes-num-train', '64', '--epochs', '1', '--exit-after-steps', '1', '--print-freq', '1',
         '--zeroshot-datasets', 'shapes', '--image-size', '16']        # a later --image-size wins


@st.composite
def small_runs(draw):
    """Flags of a cheap run (tiny models, 64 shapes samples, one step) with edge values."""
    model = draw(st.sampled_from(TINY_MODELS))
    argv = ['--model', model, '--batch-size', draw(st.sampled_from(['32', '16', '2', '1']))]
    options = {
        '--image-size': st.sampled_from(['1', '7', '8', '12', '16', '24', '32']),
        '--lr': st.sampled_from(['3e-3', '1e-30', '1e9', 'inf', 'nan']),
        '--wd': st.sampled_from(['0', '0.1', '1e9', 'nan']),
        '--label-smoothing': st.sampled_from(['0', '0.1', '0.99']),
        '--num-augs': st.sampled_from(['0', '1', '2']),
        '--update-freq': st.sampled_from(['1', '2', '3']),
        '--accum-mode': st.sampled_from(['cached', 'simple']),
        '--context-length': st.sampled_from(['1', '2', '5', '77']),
        '--text-reduction': st.sampled_from(['none', 'truncate', 'random', 'shuffle']),
        '--text-context': st.sampled_from(['3', '5', '32']),
        '--patch-dropout': st.sampled_from(['0', '0.5', '0.99']),
        '--keep-checkpoints': st.sampled_from(['-1', '0', '1', '3']),
        '--precision': st.sampled_from(['auto', 'fp32', 'bf16']),
    }
    for flag in draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True)):
        argv += [flag, draw(options[flag])]
    return argv


@pytest.mark.slow
@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],          # no shrinking: minutes of main() runs
          report_multiple_bugs=False,
          suppress_health_check=[HealthCheck.too_slow])
@given(small_runs())
def test_main_trains_or_exits_with_one_line(argv):
    with tempfile.TemporaryDirectory() as out:          # ~100 MB of checkpoint per example
        check_main(argv, out)


# Accepted by parse_args, found while writing this test: each a traceback at the first step.
CRASHES = [
    ['--model', 'CLIP_TINYCNN_CLIP', '--lr', 'nan'],             # ValueError in torch.optim.AdamW
    ['--model', 'CLIP_TINYCNN_CLIP', '--image-size', '8'],       # RuntimeError: pooling output 0x0 (< 16 px)
    ['--model', 'CLIP_TINYVIT_CLIP', '--image-size', '7'],       # RuntimeError: 8 px patch > image
    ['--model', 'CL2L_TINYCNN_CL2L', '--multicrop-resize', '8'],  # RuntimeError: the views, same
    ['--model', 'CLIP_TINYCNN_CLIP', '--batch-size', '1'],       # ValueError: BatchNorm in the projector
]


@pytest.mark.parametrize('argv', CRASHES, ids=lambda a: ' '.join(a[1:]))
def test_main_known_edge_values(tmp_path, argv):
    check_main(['--batch-size', '32', *argv], str(tmp_path))


def check_main(argv, out):
    """main() trains one step (checkpoint written) or exits with one line."""
    full = [*SMALL, *argv, '--output-dir', out]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            train.main(full)
    except SystemExit as e:
        if e.code == 2:                                     # rejected by the parser
            assert one_line_error(err), (full, err.getvalue())
        else:                                               # rejected later: the message is the line
            assert isinstance(e.code, str) and e.code.startswith('main.py: error:') \
                and '\n' not in e.code, (full, e.code)
        return
    except Exception as e:  # noqa: BLE001
        frames = traceback.format_exception(e)
        pytest.fail(f"main({full!r}) raised {frames[-1].strip()}; traceback ends:\n{''.join(frames[-6:])}")
    assert os.path.isfile(os.path.join(out, 'checkpoint.pt')), full      # one step, checkpointed


# ----------------------------------------------------------------------------- 4. counts

NOT_COUNTS = {'--seed'}                          # any integer is a seed
COMPANIONS = {'--lock-image-unlocked-groups': ['--lock-image'], '--lock-text-unlocked-layers': ['--lock-text']}


def _int_options(parser):
    return [a.option_strings[-1] for a in parser._actions
            if a.type is int and a.option_strings[-1] not in NOT_COUNTS]


class Started(Exception):
    """The script got past its checks into the work."""


def _scripts(tmp_path, monkeypatch):
    """script -> (its entry point up to the work, argv up to the count checks, its parser)."""
    import eval_linear
    import eval_zeroshot
    import finetune_classification
    import zeroshot
    from zs_helpers import tiny_checkpoint

    def started(*args, **kwargs):
        raise Started
    for module, name in [(zeroshot, 'run'), (eval_linear, 'extract_features'),
                         (finetune_classification, 'build_loaders')]:
        monkeypatch.setattr(module, name, started)
    ckpt, out = tiny_checkpoint(tmp_path / 'tiny.pt'), str(tmp_path / 'out')
    return {'main.py': (train.parse_args, ['--output-dir', out], train.get_args_parser()),
            'eval_zeroshot.py': (eval_zeroshot.main, ['--resume', ckpt], eval_zeroshot.get_args_parser()),
            'eval_linear.py': (eval_linear.main, ['--resume', ckpt, '--dataset', 'shapes'],
                               eval_linear.get_args_parser()),
            'finetune_classification.py': (finetune_classification.main,
                                           ['--train-dir', str(tmp_path), '--val-dir', str(tmp_path),
                                            '--output-dir', out], finetune_classification.get_args_parser())}


def test_negative_counts_are_refused_with_one_line(tmp_path, monkeypatch):
    """Every integer flag but the seed counts something: -1 stops before any work with one line
    naming it (an accepted --max-bad-steps -1 stopped a healthy run: '0 steps in a row had a
    non-finite loss'; --save-freq-steps -1, --exit-after-steps -1 ran as if 0)."""
    accepted = []
    for script, (main, base, parser) in _scripts(tmp_path, monkeypatch).items():
        for flag in _int_options(parser):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    main([*base, *COMPANIONS.get(flag, []), flag, '-1'])
                accepted.append(f'{script} {flag} -1')
            except Started:
                accepted.append(f'{script} {flag} -1')
            except SystemExit as e:
                if not (e.code == 2 and one_line_error(err, script) and flag in err.getvalue()):
                    accepted.append(f'{script} {flag} -1: {e.code} {err.getvalue()!r}')
    assert not accepted, accepted

"""Gradient accumulation: `--accum-mode cached` (default) gives the update of one big batch;
`simple` sums independent micro-batch losses (upstream); DDP all-reduces once per update."""
import contextlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import engine
import main as train
import methods
import models
from dist_step import CASES, global_batch, has_batchnorm   # tests/ is on sys.path under pytest

CPU = torch.device('cpu')
K = 2


def _setup(model_name, *flags, dtype=torch.float64):
    args = train.parse_args(['--model', model_name, *flags])
    torch.manual_seed(0)
    model = models.create_model_from_flags(args.model, args).to(dtype)
    return args, model, methods.build_loss(args)


def _split(batch, k):
    n = len(batch['text'])
    return [{key: v[j * n // k:(j + 1) * n // k] for key, v in batch.items()} for j in range(k)]


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_close(got, ref, rtol):
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        err = (got[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err <= rtol, (name, float(err))


def _scaler():
    return torch.amp.GradScaler('cpu', enabled=False)


@pytest.mark.parametrize('case', [c for c in CASES if not has_batchnorm(c)])
def test_cached_accumulation_equals_one_big_batch(case, tokenizer):
    args, model, loss_fn = _setup(*CASES[case])
    views = args.num_augs if args.base == 'CL2L' else 0
    batch = global_batch(model, tokenizer, views)
    ref = loss_fn(model(batch))
    ref['loss'].backward()
    ref_grads = _grads(model)
    terms = engine.accumulate_cached(model, loss_fn, _split(batch, K), _scaler(), CPU, 'fp32')
    assert torch.allclose(terms['loss'], ref['loss'].detach(), rtol=1e-10, atol=0)
    _assert_close(_grads(model), ref_grads, 1e-9)


def test_simple_accumulation_averages_micro_batch_gradients(tokenizer):
    args, model, loss_fn = _setup(*CASES['CLIP'])
    micro = _split(global_batch(model, tokenizer, 0), K)
    expected = {}
    for batch in micro:
        for name, g in _grads_after(model, loss_fn, batch).items():
            expected[name] = expected.get(name, 0) + g / K
    terms = engine.accumulate_simple(model, loss_fn, micro, _scaler(), CPU, 'fp32')
    _assert_close(_grads(model), expected, 1e-12)
    losses_each = [loss_fn(model(b))['loss'].detach() for b in micro]
    assert torch.allclose(terms['loss'], sum(losses_each) / K)
    # and it is not the big-batch gradient: fewer negatives per sample
    big = _grads_after(model, loss_fn, global_batch(model, tokenizer, 0))
    assert any((big[n] - expected[n]).norm() > 1e-6 * big[n].norm() for n in big)


def _grads_after(model, loss_fn, batch):
    loss_fn(model(batch))['loss'].backward()
    return _grads(model)


def test_cached_recompute_replays_dropout(tokenizer):
    """With text dropout on, the pass with gradient draws the same masks as the cached pass."""
    args, model, loss_fn = _setup('CL2L_TINYVIT_CL2L', '--separate-proj', '--cl2l-img-proj-type', 'linear',
                                  '--cl2l-txt-proj-type', 'linear', '--text-dropout-prob', '0.3')
    batch = global_batch(model, tokenizer, args.num_augs)
    seen = []

    def recording_loss(out):
        seen.append(engine._detach(out))
        return loss_fn(out)

    engine.accumulate_cached(model, recording_loss, _split(batch, K), _scaler(), CPU, 'fp32')
    assert len(seen) == K
    for a, b in zip(seen[0]['h_text_views'], seen[1]['h_text_views']):
        assert torch.equal(a, b)             # micro-batch 0 live in pass 0 == cached in pass 1
    rng = torch.get_rng_state()
    again = model(_split(batch, K)[0])['h_text_views'][0]
    torch.set_rng_state(rng)
    assert not torch.equal(again, seen[0]['h_text_views'][0][:4])    # dropout is really on


def test_cached_pass_updates_batchnorm_statistics_once(tokenizer):
    args, model, loss_fn = _setup('CLIP_TINYCNN_CLIP', dtype=torch.float32)
    micro = _split(global_batch(model, tokenizer, 0), K)
    micro = [{k: v.float() if v.is_floating_point() else v for k, v in b.items()} for b in micro]
    reference = models.create_model_from_flags(args.model, args)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for b in micro:
            reference(b)
    engine.accumulate_cached(model, loss_fn, micro, _scaler(), CPU, 'fp32')
    ref_buffers = dict(reference.named_buffers())
    for name, buf in model.named_buffers():
        assert torch.equal(buf, ref_buffers[name]), name


@contextlib.contextmanager
def _one_process_group():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group('gloo', init_method=f'file://{os.path.join(tmp, "store")}',
                                rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize('mode', ['cached', 'simple'])
def test_ddp_all_reduces_once_per_update(mode, tokenizer):
    """Gradients are all-reduced on the last micro-batch only (DDP no_sync before it)."""
    args, model, loss_fn = _setup(*CASES['CLIP'])
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    with _one_process_group():
        net = torch.nn.parallel.DistributedDataParallel(model)
        net.register_comm_hook(None, counting_hook)
        batch = global_batch(model, tokenizer, 0)
        engine.ACCUMULATE[mode](net, loss_fn, _split(batch, 1), _scaler(), CPU, 'fp32')
        calls.clear()                        # DDP re-buckets after its first iteration
        engine.ACCUMULATE[mode](net, loss_fn, _split(batch, 1), _scaler(), CPU, 'fp32')
        per_update = len(calls)
        assert per_update >= 1
        calls.clear()
        engine.ACCUMULATE[mode](net, loss_fn, _split(batch, 4), _scaler(), CPU, 'fp32')
        assert len(calls) == per_update, (mode, per_update, len(calls))


@pytest.mark.parametrize('mode', ['cached', 'simple'])
def test_main_trains_with_update_freq(mode, tmp_path):
    from test_main import TINY, read_jsonl
    out = str(tmp_path / mode)
    train.main([*TINY, '--output-dir', out, '--epochs', '1', '--update-freq', '2', '--accum-mode', mode])
    steps = read_jsonl(os.path.join(out, 'log_steps.txt'))
    assert [s['step'] for s in steps] == [1, 2, 3, 4]        # 512 samples / (64 x 2)
    ckpt = torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)
    assert ckpt['step'] == 4 and ckpt['args']['accum_mode'] == mode
    assert all(torch.isfinite(torch.tensor(s['loss'])) for s in steps)

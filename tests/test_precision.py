"""The mixed-precision paths of the step (engine.accumulate_* under engine.autocast), run on
CPU: `bf16` (autocast bfloat16) and `amp` (autocast float16 + GradScaler, what CUDA runs).
Their speed cannot be measured without a GPU; their correctness can: the loss and the
gradients follow the fp32 step, and the scaler skips an overflowing step."""
import pytest
import torch

import engine
import main as train
import methods
import models

DEVICE = torch.device('cpu')


def _batch(size, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(n, 77, dtype=torch.long)
    text[:, 0], text[:, 1:8] = 49406, torch.randint(1, 49000, (n, 7), generator=g)
    text[torch.arange(n), torch.randint(8, 20, (n,), generator=g)] = 49407
    return {'image': torch.randn(n, 3, size, size, generator=g), 'text': text}


def _step_grads(model_name, precision, scaler=None):
    """Loss and unscaled gradients of one step (fresh, identically initialised model)."""
    torch.manual_seed(0)
    model = models.create_model(model_name).train()
    loss_fn = methods.build_loss(train.parse_args(['--model', model_name]))
    scaler = scaler or torch.amp.GradScaler('cpu', enabled=False)
    size = models.BACKBONES.get(models.parse_model_name(model_name)[1]).image_size
    terms = engine.accumulate_simple(model, loss_fn, [_batch(size)], scaler, DEVICE, precision)
    inv = 1.0 / scaler.get_scale() if scaler.is_enabled() else 1.0
    return terms['loss'].float(), {n: p.grad.float() * inv for n, p in model.named_parameters()
                                   if p.grad is not None}


def _cosine(a, b):
    return float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()).clamp_min(1e-30))


@pytest.mark.parametrize('model_name', ['CLIP_TINYVIT_CLIP', 'CLIP_TINYCNN_CLIP'])
@pytest.mark.parametrize('precision', ['bf16', 'amp'])
def test_mixed_precision_step_follows_fp32(model_name, precision):
    ref_loss, ref = _step_grads(model_name, 'fp32')
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10) if precision == 'amp' else None
    loss, got = _step_grads(model_name, precision, scaler)
    assert abs(float(loss) - float(ref_loss)) <= 0.02 * abs(float(ref_loss)), (loss, ref_loss)
    assert float(loss) != float(ref_loss)       # the low precision really ran
    assert got.keys() == ref.keys()
    big = max(float(g.norm()) for g in ref.values())
    cosines = {}
    for name, g in ref.items():
        assert torch.isfinite(got[name]).all(), name
        if g.norm() > 1e-3 * big:     # directions of near-zero gradients are rounding noise
            cosines[name] = _cosine(got[name], g)
    # bfloat16 keeps 8 mantissa bits: through the TinyCNN's BatchNorms the first layers'
    # gradients lose direction (measured min 0.86 vs 0.99 with fp16); a broken path gives ~0
    floor = {'bf16': 0.8, 'amp': 0.98}[precision]
    assert min(cosines.values()) > floor, sorted(cosines.items(), key=lambda kv: kv[1])[:3]
    assert sum(cosines.values()) / len(cosines) > 0.95


def test_amp_scaler_skips_an_overflowing_step_and_backs_off():
    """fp16 overflow: GradScaler leaves the weights untouched and halves its scale (the step is
    not counted as bad by engine.train_step's guard: the scaler owns overflow under amp)."""
    torch.manual_seed(0)
    model = models.create_model('CLIP_TINYVIT_CLIP').train()
    loss_fn = methods.build_loss(train.parse_args([]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 60)   # scaled loss overflows fp16 grads
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.accumulate_simple(model, loss_fn, [_batch(32)], scaler, DEVICE, 'amp')
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 59
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n

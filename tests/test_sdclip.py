"""SDCLIP (self-distillation, Cheng et al. 2021 / train-CLIP): the targets are the Sinkhorn plan
of the teacher's cost with the similar pairs getting the mass; the KL is a KL of distributions
(log-probabilities); gradients reach the student and its temperature, never the teacher; the
teacher starts as the student and follows it by an exact EMA; every term is logged and a run
resumes bit-identically, teacher included. Two processes and cached accumulation equal one big
batch through METHOD_CASES (tests/test_distributed.py, tests/test_accumulation.py)."""
import json
import math
import os

import torch
import torch.nn.functional as F

import losses
import main as train
import methods
import models
from conftest import params_without_grad


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def _reference_plan(cost, epsilon, iters):
    """Sinkhorn-Knopp written out: P proportional to exp(-C / epsilon), then alternately every
    column (candidate) scaled to hold 1/n and every row (anchor) 1/n; times n (rows sum to 1)."""
    n = cost.shape[0]
    plan = torch.exp(-cost / epsilon)
    plan = plan / plan.sum()
    for _ in range(iters):
        plan = plan / plan.sum(0, keepdim=True) / n
        plan = plan / plan.sum(1, keepdim=True) / n
    return plan * n


def _teacher_costs(image, text):
    """The teacher's costs of Cheng et al.: -(S_ii + S_tt + S_it) and -(S_ii + S_tt + S_ti)."""
    s_ii, s_tt, s_it = image @ image.t(), text @ text.t(), image @ text.t()
    return -(s_ii + s_tt + s_it), -(s_ii + s_tt + s_it.t())


def _kl(targets, logits):
    """sum_j t_ij log(t_ij / p_ij), p = softmax of the row, averaged over rows, term by term."""
    total = 0.0
    for t_row, l_row in zip(targets.tolist(), logits.tolist()):
        norm = math.log(sum(math.exp(v) for v in l_row))
        total += sum(t * (math.log(t) - (v - norm)) for t, v in zip(t_row, l_row) if t > 0)
    return total / len(targets)


def test_targets_are_the_sinkhorn_plan_of_the_teacher_cost():
    torch.manual_seed(0)
    n, d = 8, 6
    image = _unit(n, d)
    text = F.normalize(image + 0.3 * torch.randn(n, d, dtype=torch.float64), dim=-1)   # paired
    cost_i2t, cost_t2i = _teacher_costs(image, text)
    got_i2t, got_t2i = losses.self_distillation_targets(image, text, epsilon=0.05, iters=3)
    for got, cost in ((got_i2t, cost_i2t), (got_t2i, cost_t2i)):
        ref = _reference_plan(cost, 0.05, 3)
        assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-7)
        assert torch.allclose(got.sum(1), torch.ones(n), atol=1e-5)          # one distribution per anchor
        assert torch.equal(got.argmax(1), torch.arange(n))                   # the low-cost pair gets the mass
    many, _ = losses.self_distillation_targets(image, text, epsilon=0.05, iters=200)
    assert torch.allclose(many.sum(0), torch.ones(n), atol=1e-3)             # both marginals: a transport plan


def test_loss_is_clip_plus_the_kl_of_distributions():
    torch.manual_seed(0)
    n, d = 6, 8
    out = {'image_embed': _unit(n, d), 'text_embed': _unit(n, d),
           'image_embed_teacher': _unit(n, d), 'text_embed_teacher': _unit(n, d),
           'logit_scale': torch.tensor(14.0, dtype=torch.float64),
           'sd_logit_scale': torch.tensor(9.0, dtype=torch.float64)}
    terms = losses.SDCLIPLoss(label_smoothing=0.1, kl_coeff=0.7)(out)
    cost_i2t, cost_t2i = _teacher_costs(out['image_embed_teacher'], out['text_embed_teacher'])
    sims = out['image_embed'] @ out['text_embed'].t()
    kl_i2t = _kl(_reference_plan(cost_i2t, 0.05, 3), 9.0 * sims)
    kl_t2i = _kl(_reference_plan(cost_t2i, 0.05, 3), 9.0 * sims.t())
    assert math.isclose(terms['sd_kl_i2t'].item(), kl_i2t, rel_tol=1e-5)
    assert math.isclose(terms['sd_kl_t2i'].item(), kl_t2i, rel_tol=1e-5)
    assert math.isclose(terms['sd_loss'].item(), (kl_i2t + kl_t2i) / 2, rel_tol=1e-5)
    clip = losses.CLIPLoss(label_smoothing=0.1)(out)
    assert terms['clip_loss'] == clip['clip_loss']
    assert math.isclose(terms['loss'].item(), clip['loss'].item() + 0.7 * (kl_i2t + kl_t2i) / 2, rel_tol=1e-6)
    # log-probabilities: a constant added to the logits changes no distribution (raw logits would)
    targets = _reference_plan(cost_i2t, 0.05, 3)
    assert math.isclose(losses.kl_to_targets(targets, sims + 5).item(), losses.kl_to_targets(targets, sims).item(),
                        rel_tol=1e-12)


def _model_and_batch(tokenizer, name='CLIP_TINYVIT_SDCLIP'):
    torch.manual_seed(0)
    model = models.create_model(name)
    batch = {'image': torch.randn(6, 3, model.image_size, model.image_size),
             'text': tokenizer([f'a picture of item {i}' for i in range(6)])}
    return model, batch


def test_gradients_reach_the_student_and_the_temperature_not_the_teacher(tokenizer):
    model, batch = _model_and_batch(tokenizer)
    out = model(batch)
    assert not out['image_embed_teacher'].requires_grad and not out['text_embed_teacher'].requires_grad
    losses.SDCLIPLoss()(out)['loss'].backward()
    assert not params_without_grad(model)                      # every student parameter, sd_logit_scale too
    teacher = [p for n, p in model.named_parameters() if n.startswith('teacher.')]
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    model.zero_grad()
    losses.SDCLIPLoss(kl_coeff=0.0)(model(batch))['loss'].backward()
    assert model.sd_logit_scale.grad == 0                      # the temperature is the KL term's alone


def test_teacher_starts_as_the_student_and_follows_by_exact_ema():
    torch.manual_seed(0)
    model = models.create_model('CLIP_TINYVIT_SDCLIP')
    student = {n: p for n, p in model.state_dict().items() if not n.startswith('teacher.')}
    assert all(torch.equal(model.teacher.state_dict()[n], p) for n, p in student.items())
    assert math.isclose(model.sd_logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    student = {n: p.clone() for n, p in model.named_parameters() if not n.startswith('teacher.')}
    assert train.parse_args(['--model', 'CLIP_TINYVIT_SDCLIP']).sdclip_momentum_tau == 0.999
    methods.step_hook(train.parse_args(['--model', 'CLIP_TINYVIT_SDCLIP', '--sdclip-momentum-tau', '0.9']))(model)
    for n, t in model.teacher.named_parameters():
        assert torch.allclose(t, 0.9 * before[n] + 0.1 * student[n], rtol=0, atol=1e-6), n


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_trains_logs_every_term_and_resumes_bit_identically_teacher_included(tmp_path):
    common = ['--model', 'CLIP_TINYCNN_SDCLIP', '--shapes-num-train', '128', '--batch-size', '32',
              '--epochs', '2', '--eval-freq', '2', '--print-freq', '1', '--zeroshot-datasets', 'shapes']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    train.main([*common, '--output-dir', straight])
    assert train.main([*common, '--output-dir', split, '--exit-after-steps', '3']) is None
    train.main([*common, '--output-dir', split])                               # the same command resumes
    steps = _read_jsonl(os.path.join(straight, 'log_steps.txt'))
    assert len(steps) == 8 and all(s['sd_loss'] > 0 and s['sd_kl_i2t'] > 0 and s['sd_kl_t2i'] > 0
                                   and s['sd_logit_scale'] > 0 for s in steps)
    a, b = (torch.load(os.path.join(d, 'checkpoint.pt'), weights_only=True) for d in (straight, split))
    assert a['step'] == b['step'] == 8
    assert any(k.startswith('teacher.') for k in a['model']) and 'sd_logit_scale' in a['model']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for i in a['optimizer']['state']:
        for k in a['optimizer']['state'][i]:
            assert torch.equal(a['optimizer']['state'][i][k], b['optimizer']['state'][i][k]), (i, k)
    moved = [k for k in a['model'] if k.startswith('teacher.') and a['model'][k].is_floating_point()
             and not torch.equal(a['model'][k], a['model'][k[len('teacher.'):]])]
    assert moved                                                               # an EMA, not a copy


def test_openclip_export_leaves_out_the_teacher_and_import_starts_it_as_the_student(tokenizer):
    """An SDCLIP model exports its student to OpenCLIP (the teacher and the temperature said
    to be left out), and an OpenCLIP checkpoint imports into an SDCLIP model to train on."""
    import interop_openclip
    ours, batch = _model_and_batch(tokenizer)
    cfg, state, notes = interop_openclip.to_openclip(ours)
    assert notes == ['not exported (no OpenCLIP equivalent; zero-shot uses the z head): sd_logit_scale, teacher']
    torch.manual_seed(1)
    fresh = models.create_model('CLIP_TINYVIT_SDCLIP')
    notes = interop_openclip.load_openclip(fresh, state, cfg)
    assert 'kept at initialisation (not in the checkpoint): sd_logit_scale' in notes
    assert 'EMA teacher initialised as a copy of the loaded model' in notes
    ours.eval(), fresh.eval()
    with torch.no_grad():
        want = ours(batch)
        for model in (fresh, fresh.teacher):       # the teacher: a copy of the imported student
            got = model(batch)
            for k in ('image_embed', 'text_embed', 'logit_scale'):
                assert torch.allclose(got[k], want[k], atol=1e-5), k

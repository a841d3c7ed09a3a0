"""CLIPLoss against a direct, loop-based formula."""
import math

import pytest
import torch

import losses


def direct_clip_loss(img, txt, scale, smoothing, avg):
    n = img.shape[0]

    def ce(logits):  # smoothed cross-entropy written out per row
        total = 0.0
        for i in range(n):
            logp = logits[i] - torch.logsumexp(logits[i], 0)
            target = torch.full((n,), smoothing / n, dtype=torch.float64)
            target[i] += 1 - smoothing
            total += -(target * logp).sum()
        return total / n
    sim = torch.tensor([[float(img[i] @ txt[j]) for j in range(n)] for i in range(n)],
                       dtype=torch.float64) * scale
    l_i2t, l_t2i = ce(sim), ce(sim.t())
    return (l_i2t + l_t2i) / (2 if avg else 1), l_i2t, l_t2i


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('avg_or_sum', ['avg', 'sum'])
def test_clip_loss_matches_formula(smoothing, avg_or_sum):
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    terms = losses.CLIPLoss(smoothing, avg_or_sum)(
        {'image_embed': img, 'text_embed': txt, 'logit_scale': scale})
    ref, ref_i2t, ref_t2i = direct_clip_loss(img, txt, scale.item(), smoothing, avg_or_sum == 'avg')
    assert math.isclose(terms['loss'].item(), float(ref), rel_tol=1e-9)
    assert math.isclose(terms['loss_i2t'].item(), float(ref_i2t), rel_tol=1e-9)
    assert math.isclose(terms['loss_t2i'].item(), float(ref_t2i), rel_tol=1e-9)


def test_clip_accuracy_and_named_terms():
    e = torch.eye(4)
    terms = losses.CLIPLoss()({'image_embed': e, 'text_embed': e[[0, 1, 3, 2]],
                               'logit_scale': torch.tensor(10.0)})
    assert terms['clip_acc'].item() == 50.0
    assert {'loss', 'loss_i2t', 'loss_t2i', 'clip_acc', 'logit_scale'} <= set(terms)


def test_bad_reduction():
    with pytest.raises(ValueError, match='valid: avg, sum'):
        losses.CLIPLoss(avg_or_sum='mean')

"""Model zoo beyond CLIP: every base x backbone x method trains; each loss equals a direct
reference computation; CL2L with no views is exactly CLIP; the EMA teacher update is exact;
text augmentation is seeded; nonsensical combinations fail at parse time."""
import argparse
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import augment
import losses
import main as train
import models
from conftest import params_without_grad, unzero_norms

TINY = ('TINYVIT', 'TINYCNN')
LOSS_ARGS = argparse.Namespace(label_smoothing=0.0, loss_avg_or_sum='avg', barlip_lamb=5e-3,
                               barlip_scale_loss=0.025, swalip_weight=0.2, target_epsilon=0.05,
                               sk_iters=3)
SMALL_HEADS = dict(clip_hidden_dim=64, barlip_hidden_dim=64, barlip_proj_dim=64,
                   siamlip_hidden_dim=64, siamlip_proj_dim=32)


def _batch(model, tokenizer, n=4, views=2):
    size = model.image_size
    batch = {'image': torch.randn(n, 3, size, size),
             'text': tokenizer([f'a photo of thing {i}' for i in range(n)])}
    if isinstance(model, models.CL2L):
        batch['image_views'] = torch.randn(n, views, 3, size, size)
        batch['text_views'] = tokenizer([f'view {i}' for i in range(n * views)]).view(n, views, -1)
    return batch


def _params(name):
    backbone = name.split('_')[1]
    return pytest.param(name, marks=() if backbone in TINY else pytest.mark.slow)


@pytest.mark.parametrize('name', [_params(n) for n in models.list_models()])
def test_every_combination_trains(name, tokenizer):
    torch.manual_seed(0)
    backbone = models.BACKBONES[name.split('_')[1]]
    kw = {} if name.split('_')[1] in TINY else dict(SMALL_HEADS, transformer_layers=1)
    model = models.create_model(name, image_size=min(backbone.image_size, 64),
                                separate_proj=True, **kw)
    unzero_norms(model)
    terms = losses.build_loss(name.split('_')[2], LOSS_ARGS)(model(_batch(model, tokenizer)))
    assert all(torch.isfinite(v).all() for v in terms.values()), terms
    terms['loss'].backward()
    missing = params_without_grad(model)
    assert not missing, f'trainable parameters without gradient: {missing[:8]}'
    teacher = [p for n, p in model.named_parameters() if n.startswith('teacher.')]
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    assert bool(teacher) == name.endswith('_BYOLIP')


@pytest.mark.parametrize('name, fragment', [
    ('CLIP_TINYVIT_CL2L', "augmented views"),
    ('CL2L_TINYVIT_CLIP', 'use method CL2L'),
    ('CL2L_TINYVIT_SIGLIP', 'sigmoid'),
    ('CLIP_TINYVIT_BARLIP', 'augmented views'),
])
def test_nonsense_combinations_say_why(name, fragment):
    with pytest.raises(ValueError, match=fragment):
        models.parse_model_name(name)


@pytest.mark.parametrize('argv, fragment', [
    (['--model', 'CL2L_TINYVIT_SWALIP', '--label-smoothing', '0.1'], 'needs --label-smoothing 0'),
    (['--model', 'CL2L_TINYVIT_SWALIP', '--num-augs', '0'], 'num-augs >= 1'),
    (['--model', 'CL2L_TINYVIT_CL2L', '--momentum'], 'goes with *_SIAMLIP'),
    (['--model', 'CL2L_TINYVIT_CL2L', '--random-swap-prob', '0.9'], 'sum to <= 1'),
])
def test_bad_method_flags_fail_at_parse_time(argv, fragment, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert fragment in capsys.readouterr().err


def test_upstream_momentum_spelling_selects_byolip():
    args = train.parse_args(['--model', 'CL2L_TINYVIT_SIAMLIP', '--momentum', '--separate-proj'])
    assert args.model == 'CL2L_TINYVIT_BYOLIP' and args.momentum_tau == 0.99
    args = train.parse_args(['--model', 'CL2L_TINYVIT_BYOLIP', '--momentum', '0.996'])
    assert args.momentum_tau == 0.996


# ----------------------------------------------------------------------------- losses

def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def _ce(logits, smoothing=0.0):
    """Row-wise smoothed cross-entropy against the diagonal, written out."""
    n, total = logits.shape[0], 0.0
    for i in range(n):
        logp = logits[i] - torch.logsumexp(logits[i], 0)
        target = torch.full((n,), smoothing / n, dtype=torch.float64)
        target[i] += 1 - smoothing
        total = total - (target * logp).sum()
    return total / n


@pytest.mark.parametrize('avg_or_sum, smoothing', [('avg', 0.0), ('sum', 0.1)])
def test_cl2l_loss_matches_formula(avg_or_sum, smoothing):
    torch.manual_seed(0)
    B, D, V = 5, 8, 3
    out = {'image_embed': _unit(B, D), 'text_embed': _unit(B, D),
           'h_image_views': [_unit(B, D) for _ in range(V)],
           'h_text_views': [_unit(B, D) for _ in range(V)],
           'logit_scale': torch.tensor(14.0, dtype=torch.float64),
           'h_logit_scale': torch.tensor(10.0, dtype=torch.float64)}
    terms = losses.CL2LLoss(smoothing, avg_or_sum)(out)
    s, h = 14.0, 10.0
    g_i = _ce(s * out['image_embed'] @ out['text_embed'].t())
    g_t = _ce(s * out['text_embed'] @ out['image_embed'].t())
    l_i = sum(_ce(h * a @ b.t(), smoothing) for a in out['h_image_views'] for b in out['h_text_views']) / V ** 2
    l_t = sum(_ce(h * a @ b.t(), smoothing) for a in out['h_text_views'] for b in out['h_image_views']) / V ** 2
    ref = ((g_i + V * l_i) / (1 + V) + (g_t + V * l_t) / (1 + V)) / 2 * (2 if avg_or_sum == 'sum' else 1)
    assert math.isclose(terms['loss'].item(), ref.item(), rel_tol=1e-10)


def test_barlip_loss_matches_formula():
    torch.manual_seed(0)
    B, D = 6, 4
    z1, z2 = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)
    got = losses.BarLIPLoss(lamb=5e-3, scale=0.025).barlow(z1, z2)
    ref = 0.0
    for i in range(D):
        for j in range(D):
            c = sum(z1[b, i] * z2[b, j] for b in range(B)) / B
            ref += (c - 1) ** 2 if i == j else 5e-3 * c ** 2
    assert math.isclose(got.item(), 0.025 * float(ref), rel_tol=1e-10)


def test_siamlip_loss_uses_teacher_targets_and_stops_gradient():
    torch.manual_seed(0)
    B, D = 4, 8
    base = {'image_embed': _unit(B, D), 'text_embed': _unit(B, D), 'h_image_views': [],
            'h_text_views': [], 'logit_scale': torch.tensor(10.0, dtype=torch.float64),
            'h_logit_scale': torch.tensor(10.0, dtype=torch.float64)}
    p_i, p_t = torch.randn(B, D, dtype=torch.float64, requires_grad=True), torch.randn(B, D, dtype=torch.float64)
    v_i, v_t = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    out = dict(base, p_image=p_i, p_text=p_t, v_image=v_i, v_text=v_t, p_image_views=[],
               p_text_views=[], v_image_views=[], v_text_views=[])
    terms = losses.SiamLIPLoss()(out)
    cos = lambda a, b: (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean()  # noqa: E731
    ref = ((2 - 2 * cos(p_i, v_t)) + (2 - 2 * cos(p_t, v_i))) / 2
    assert math.isclose(terms['siamlip_loss'].item(), ref.item(), rel_tol=1e-10)
    terms['loss'].backward()
    assert v_t.grad is None and p_i.grad is not None                    # stop-gradient on targets
    teacher = dict(out, v_image_teacher=v_i * 0 + 1, v_text_teacher=v_t.detach() * 0 + 1)
    assert losses.SiamLIPLoss()(teacher)['siamlip_loss'] != terms['siamlip_loss']


def test_sinkhorn_codes_have_the_right_marginals():
    torch.manual_seed(0)
    scores = F.normalize(torch.randn(64, 8), dim=-1) @ F.normalize(torch.randn(16, 8), dim=-1).t()
    Q = losses.sinkhorn_knopp(scores, epsilon=0.05, iters=50)                  # [B=64, K=16]
    assert torch.allclose(Q.sum(1), torch.ones(64), atol=1e-5)                 # one assignment per sample
    assert torch.allclose(Q.sum(0), torch.full((16,), 64 / 16), rtol=1e-2)     # equipartition
    Q3 = losses.sinkhorn_knopp(scores)                                        # 3 iterations (default)
    assert torch.allclose(Q3.sum(1), torch.ones(64), atol=1e-5) and (Q3 >= 0).all()


def test_swalip_loss_swaps_views():
    torch.manual_seed(0)
    B, D, V = 6, 8, 2
    out = {'image_embed': _unit(B, D), 'text_embed': _unit(B, D),
           'h_image_views': [_unit(B, D) for _ in range(V)], 'h_text_views': [_unit(B, D) for _ in range(V)],
           'logit_scale': torch.tensor(10.0, dtype=torch.float64), 'h_logit_scale': torch.tensor(10.0, dtype=torch.float64)}
    terms = losses.SwALIPLoss(weight=0.2)(out)
    hi, ht = out['h_image_views'], out['h_text_views']
    ref = 0
    for a in range(V):
        for b in range(V):
            ci = losses.sinkhorn_knopp(hi[1 - a] @ ht[1 - b].t())
            ct = losses.sinkhorn_knopp(ht[1 - a] @ hi[1 - b].t())
            ref += (-(ci * F.log_softmax(10 * hi[a] @ ht[b].t(), -1)).sum(-1).mean()
                    - (ct * F.log_softmax(10 * ht[a] @ hi[b].t(), -1)).sum(-1).mean()) / 2
    ref /= V ** 2
    assert math.isclose(terms['swalip_loss'].item(), ref.item(), rel_tol=1e-6)
    cl2l = losses.CL2LLoss()(out)['loss']
    assert math.isclose(terms['loss'].item(), (cl2l + 0.2 * ref).item(), rel_tol=1e-6)


def test_siglip_loss_matches_formula():
    torch.manual_seed(0)
    B, D = 5, 6
    x, y = _unit(B, D), _unit(B, D)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    got = losses.SigLIPLoss()({'image_embed': x, 'text_embed': y, 'logit_scale': t, 'logit_bias': b})
    ref = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            ref -= math.log(1 / (1 + math.exp(-z * (10 * float(x[i] @ y[j]) - 10))))
    assert math.isclose(got['loss'].item(), ref / B, rel_tol=1e-9)


def test_siglip_init():
    m = models.create_model('CLIP_TINYVIT_SIGLIP')
    assert math.isclose(m.logit_scale.exp().item(), 10.0, rel_tol=1e-6) and m.logit_bias.item() == -10.0


# ----------------------------------------------------------------------------- CL2L == CLIP

def test_cl2l_without_views_is_exactly_clip(tokenizer):
    torch.manual_seed(0)
    clip = models.create_model('CLIP_TINYVIT_CLIP').double()
    cl2l = models.create_model('CL2L_TINYVIT_CL2L').double()
    cl2l.load_state_dict(clip.state_dict())                 # same parameter names, same weights
    batch = _batch(clip, tokenizer)
    batch['image'] = batch['image'].double()
    for sum_or_avg in ('avg', 'sum'):
        clip.zero_grad(), cl2l.zero_grad()
        a = losses.CLIPLoss(0.0, sum_or_avg)(clip(batch))['loss']
        b = losses.CL2LLoss(0.3, sum_or_avg)(cl2l(batch))['loss']   # smoothing only touches views
        a.backward(), b.backward()
        assert torch.equal(a, b)
        for (n1, p1), (n2, p2) in zip(clip.named_parameters(), cl2l.named_parameters()):
            assert n1 == n2 and torch.equal(p1.grad, p2.grad), n1


def test_ema_teacher_update_is_exact():
    torch.manual_seed(0)
    m = models.create_model('CL2L_TINYVIT_BYOLIP')
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in m.teacher.named_parameters()}
    student = {n: p.clone() for n, p in m.named_parameters() if not n.startswith('teacher.')}
    m.after_step(0.9)
    for n, t in m.teacher.named_parameters():
        expected = 0.9 * before[n] + 0.1 * student[n]
        if n.endswith('logit_scale'):
            continue                                         # clamped on the student only
        assert torch.allclose(t, expected, atol=1e-6), n


# ----------------------------------------------------------------------------- text views

@pytest.mark.needs('wordnet')
def test_eda_changes_text_and_is_seeded():
    aug = augment.TextAugment(remove_stopwords_prob=0.0, weights=(1.0, 0.0, 0.0, 0.0))
    text = 'a small red triangle in the top left corner'
    outs = {aug(text, seed) for seed in range(10)}
    assert text not in outs or len(outs) > 1
    assert any(o != text for o in outs)
    assert aug(text, 3) == aug(text, 3)
    swap = augment.TextAugment(remove_stopwords_prob=0.0, weights=(0.0, 1.0, 0.0, 0.0))
    out = swap(text, 1)
    assert out != text and sorted(out.split()) == sorted(text.split())
    stop = augment.TextAugment(remove_stopwords_prob=1.0, weights=(0.0, 0.0, 0.0, 1.0))
    assert stop('there is a blue circle on a grey background', 0) == 'blue circle grey background'


def test_a_failing_text_augmenter_keeps_the_words_and_warns(monkeypatch):
    # seen in a run: textaugment's synonym lookup hit a None WordNet synset (AttributeError)
    aug = augment.TextAugment(remove_stopwords_prob=0.0, weights=(1.0, 0.0, 0.0, 0.0))

    def broken(sentence):
        raise AttributeError("'NoneType' object has no attribute 'lemmas'")
    monkeypatch.setattr(aug.eda, 'synonym_replacement', broken)
    monkeypatch.setitem(augment._AUGMENT_FAILURES, 'count', 0)
    with pytest.warns(UserWarning, match=r"text augmentation \(synonym\) failed 1 time"):
        assert aug('a small red triangle', 0) == 'a small red triangle'
    assert aug('a small red triangle', 1) == 'a small red triangle'      # no second warning needed
    assert augment._AUGMENT_FAILURES['count'] == 2


class _WordNetLookups(torch.utils.data.Dataset):
    WORDS = ('red', 'circle', 'square', 'small', 'corner', 'background', 'picture', 'star', 'left',
             'middle', 'dark', 'light', 'blue', 'green', 'top', 'big', 'right') * 20

    def __len__(self):
        return 4

    def __getitem__(self, i):
        from nltk.corpus import wordnet
        return sum(any(s is None for s in wordnet.synsets(w)) for w in self.WORDS)


@pytest.mark.needs('wordnet')
def test_loader_workers_read_wordnet_without_sharing_file_offsets():
    # the parent has WordNet's data files open (probing a sample does that); forked workers
    # inherit them with a shared offset unless the worker_init_fn drops them. Without it this
    # race gave None synsets in 1 of 2 runs here (13 of 1 020 lookups in a direct fork test)
    augment.require_wordnet()
    from nltk.corpus import wordnet
    wordnet.synsets('dog')
    loader = torch.utils.data.DataLoader(_WordNetLookups(), batch_size=1, num_workers=2,
                                         multiprocessing_context='fork',
                                         worker_init_fn=augment.fresh_wordnet_files)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                 # NLTK warns per missing synset
        assert sum(int(b) for b in loader) == 0
    assert datasets_loader_uses_it()


def datasets_loader_uses_it():
    import datasets
    args = argparse.Namespace(workers=1, prefetch_factor=2, seed=0, train_num_samples=None, batch_size=2)
    _, loader = datasets.build_loader(_WordNetLookups(), args)
    return loader.worker_init_fn.args == (augment.fresh_wordnet_files,)   # composed by StopSafeLoader


@pytest.mark.needs('wordnet')
def test_sample_builder_views_are_deterministic(tokenizer):
    args = train.parse_args(['--model', 'CL2L_TINYCNN_CL2L', '--text-augment', '--num-augs', '3'])
    build = augment.SampleBuilder.from_args(args, tokenizer, plain_images=True)
    image = (torch.rand(3, 64, 64) * 255).to(torch.uint8)
    caps = ['a small red triangle in the top left corner', 'a red triangle']
    s1, s2, s3 = build(image, caps, 7), build(image, caps, 7), build(image, caps, 8)
    assert s1['image_views'].shape == (3, 3, 64, 64) and s1['text_views'].shape == (3, 77)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1['image_views'], s3['image_views'])

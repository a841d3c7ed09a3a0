"""Losses: one class per method (methods.py says which method uses which). Each maps the
model's output dict to a dict of named terms, `loss` being the total. Gathering across ranks
lives here and keeps the gradient, so that N processes with batch b give the gradients of one
process with batch N*b.
"""
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F

import utils


def gather_with_grad(x):
    """All-gather `x` [b, ...] from every rank -> [world*b, ...], differentiable."""
    if utils.get_world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def local_labels(embed):
    """Positions of this rank's samples in the gathered batch."""
    b = embed.shape[0]
    return torch.arange(b, device=embed.device) + utils.get_rank() * b


@torch.no_grad()
def retrieval_accuracy(logits, labels):
    """In-batch top-1 retrieval accuracy (%), averaged over ranks."""
    acc = (logits.argmax(-1) == labels).float().mean() * 100
    if utils.is_dist():
        dist.all_reduce(acc)
        acc /= utils.get_world_size()
    return acc


class CLIPLoss(nn.Module):
    """Symmetric InfoNCE over image->text and text->image logits.

    Each rank scores its local images/texts against the gathered features of all ranks
    (the "local loss"): the result and gradients equal the single-process big-batch loss.
    """

    def __init__(self, label_smoothing=0.0, avg_or_sum='avg'):
        super().__init__()
        if avg_or_sum not in ('avg', 'sum'):
            raise ValueError(f"loss reduction {avg_or_sum!r}; valid: avg, sum")
        self.label_smoothing = label_smoothing
        self.avg_or_sum = avg_or_sum

    def forward(self, outputs):
        image, text = outputs['image_embed'], outputs['text_embed']        # [b, D] normalised
        scale = outputs['logit_scale']
        all_image, all_text = gather_with_grad(image), gather_with_grad(text)  # [N*b, D]
        return self.terms(image, text, all_image, all_text, scale)

    def terms(self, image, text, all_image, all_text, scale):
        """The loss terms of this rank's embeddings against the gathered ones."""
        labels = local_labels(image)
        logits_per_image = scale * image @ all_text.t()                      # [b, N*b]
        logits_per_text = scale * text @ all_image.t()
        loss_i2t = F.cross_entropy(logits_per_image, labels, label_smoothing=self.label_smoothing)
        loss_t2i = F.cross_entropy(logits_per_text, labels, label_smoothing=self.label_smoothing)
        loss = loss_i2t + loss_t2i
        if self.avg_or_sum == 'avg':
            loss = loss / 2
        return {'loss': loss, 'clip_loss': loss.detach(), 'loss_i2t': loss_i2t.detach(),
                'loss_t2i': loss_t2i.detach(),
                'clip_acc': retrieval_accuracy(logits_per_image.detach(), labels),
                'logit_scale': scale.detach()}


class CL2LLoss(nn.Module):
    """CLIP🚀: a CLIP term on the global pair (`z`, no label smoothing) plus CLIP terms on
    all V x V (image view, text view) pairs in both directions (`h`, label smoothing).
    Per direction: (global + V * mean(local)) / (1 + V); then the mean (avg) or the sum of
    the two directions. With V = 0 this is exactly CLIPLoss without label smoothing."""

    def __init__(self, label_smoothing=0.0, avg_or_sum='avg'):
        super().__init__()
        if avg_or_sum not in ('avg', 'sum'):
            raise ValueError(f"loss reduction {avg_or_sum!r}; valid: avg, sum")
        self.label_smoothing, self.avg_or_sum = label_smoothing, avg_or_sum

    def forward(self, out):
        zi, zt, scale = out['image_embed'], out['text_embed'], out['logit_scale']
        labels = local_labels(zi)
        logits_i = scale * zi @ gather_with_grad(zt).t()                   # [b, N*b]
        logits_t = scale * zt @ gather_with_grad(zi).t()
        g_img, g_txt = F.cross_entropy(logits_i, labels), F.cross_entropy(logits_t, labels)
        hi, ht, h_scale = out['h_image_views'], out['h_text_views'], out['h_logit_scale']
        V = len(hi)
        l_img = l_txt = torch.zeros((), device=zi.device)
        if V:
            hi_all, ht_all = [gather_with_grad(h) for h in hi], [gather_with_grad(h) for h in ht]
            ce = partial(F.cross_entropy, target=labels, label_smoothing=self.label_smoothing)
            l_img = sum(ce(h_scale * a @ b.t()) for a in hi for b in ht_all) / V ** 2
            l_txt = sum(ce(h_scale * a @ b.t()) for a in ht for b in hi_all) / V ** 2
        img = (g_img + V * l_img) / (1 + V)
        txt = (g_txt + V * l_txt) / (1 + V)
        clip_loss = (img + txt) / 2
        loss = clip_loss * (2 if self.avg_or_sum == 'sum' else 1)
        return {'loss': loss, 'clip_loss': clip_loss.detach(),
                'clip_loss_image_global': g_img.detach(), 'clip_loss_text_global': g_txt.detach(),
                'clip_loss_image_local': l_img.detach(), 'clip_loss_text_local': l_txt.detach(),
                'clip_acc': retrieval_accuracy(logits_i.detach(), labels),
                'logit_scale': scale.detach(), 'h_logit_scale': h_scale.detach()}


class BarLIPLoss(CL2LLoss):
    """CL2L + Barlow Twins between image and text projections, over the global pair and
    all V x V view pairs: scale * sum((C - I)^2 with off-diagonal terms x lamb), C the
    cross-correlation averaged across ranks (differentiably, so gradients stay exact)."""

    def __init__(self, label_smoothing=0.0, avg_or_sum='avg', lamb=5e-3, scale=0.025):
        super().__init__(label_smoothing, avg_or_sum)
        self.lamb, self.scale = lamb, scale

    def barlow(self, z1, z2):
        corr = z1.t() @ z2 / z1.shape[0]                                    # [D, D]
        if utils.is_dist():
            corr = dist_fn.all_reduce(corr) / utils.get_world_size()
        diff = (corr - torch.eye(corr.shape[0], device=corr.device)).pow(2)
        off = diff.sum() - diff.diagonal().sum()
        return self.scale * (diff.diagonal().sum() + self.lamb * off)

    def forward(self, out):
        terms = super().forward(out)
        pairs = [(out['v_image'], out['v_text'])]
        pairs += [(a, b) for a in out['v_image_views'] for b in out['v_text_views']]
        barlip = sum(self.barlow(a, b) for a, b in pairs) / len(pairs)
        return {**terms, 'loss': terms['loss'] + barlip, 'barlip_loss': barlip.detach()}


class SiamLIPLoss(CL2LLoss):
    """CL2L + SimSiam across modalities: 2 - 2 cos(prediction, stop-grad target) for image
    predictions vs text targets and vice versa, over the global pair and all view pairs.
    Targets come from the EMA teacher when the model has one (BYOLIP)."""

    @staticmethod
    def neg_cos(p, v):
        return 2 - 2 * (F.normalize(p, dim=-1) * F.normalize(v.detach(), dim=-1)).sum(-1).mean()

    def forward(self, out):
        terms = super().forward(out)
        t = '_teacher' if 'v_image_teacher' in out else ''
        pairs = [(out['p_image'], out['v_text' + t]), (out['p_text'], out['v_image' + t])]
        pairs += [(p, v) for p in out['p_image_views'] for v in out['v_text_views' + t]]
        pairs += [(p, v) for p in out['p_text_views'] for v in out['v_image_views' + t]]
        siam = sum(self.neg_cos(p, v) for p, v in pairs) / len(pairs)
        return {**terms, 'loss': terms['loss'] + siam, 'siamlip_loss': siam.detach()}


@torch.no_grad()
def sinkhorn_knopp(scores, epsilon=0.05, iters=3):
    """Codes [b, K] for scores [b, K] (this rank's samples vs K prototypes): equipartition
    over the prototypes across all ranks' samples; each row sums to 1."""
    Q = torch.exp(scores.float() / epsilon).t()                             # [K, b]
    K, B = Q.shape[0], Q.shape[1] * utils.get_world_size()
    total = Q.sum()
    if utils.is_dist():
        dist.all_reduce(total)
    Q /= total
    for _ in range(iters):
        rows = Q.sum(dim=1, keepdim=True)                                    # per prototype
        if utils.is_dist():
            dist.all_reduce(rows)
        Q /= rows * K
        Q /= Q.sum(dim=0, keepdim=True) * B                                  # per sample
    return (Q * B).t()


class SwALIPLoss(CL2LLoss):
    """CL2L + swapped prediction: for each (image view a, text view b) pair the other
    modality's gathered batch serves as prototypes; Sinkhorn codes of pair
    ((a+1) % V, (b+1) % V) are the targets of pair (a, b). Needs V >= 1 views and no label
    smoothing (the codes are soft targets already): methods.py's SWALIP entry checks the flags."""

    def __init__(self, label_smoothing=0.0, avg_or_sum='avg', weight=0.2, epsilon=0.05, iters=3):
        super().__init__(label_smoothing, avg_or_sum)
        self.weight, self.epsilon, self.iters = weight, epsilon, iters

    def forward(self, out):
        terms = super().forward(out)
        hi, ht, scale = out['h_image_views'], out['h_text_views'], out['h_logit_scale']
        V = len(hi)
        hi_all, ht_all = [gather_with_grad(h) for h in hi], [gather_with_grad(h) for h in ht]
        sim_img = [[a @ b.t() for b in ht_all] for a in hi]                  # [V][V] of [b, N*b]
        sim_txt = [[a @ b.t() for b in hi_all] for a in ht]
        codes_img = [[sinkhorn_knopp(s, self.epsilon, self.iters) for s in row] for row in sim_img]
        codes_txt = [[sinkhorn_knopp(s, self.epsilon, self.iters) for s in row] for row in sim_txt]

        def ce(logits, codes):
            return -(codes * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        swalip = 0
        for a in range(V):
            for b in range(V):
                sa, sb = (a + 1) % V, (b + 1) % V
                swalip = swalip + (ce(scale * sim_img[a][b], codes_img[sa][sb])
                                   + ce(scale * sim_txt[a][b], codes_txt[sa][sb])) / 2
        swalip = swalip / V ** 2
        return {**terms, 'loss': terms['loss'] + self.weight * swalip,
                'swalip_loss': swalip.detach()}


@torch.no_grad()
def self_distillation_targets(teacher_image, teacher_text, epsilon=0.05, iters=3):
    """Soft image->text and text->image targets [b, N*b] of this rank's samples (Cheng et al.
    2021): Sinkhorn-Knopp transport plans for the teacher's costs -(S_ii + S_tt + S_it) and
    -(S_ii + S_tt + S_ti), S the cosine similarities over the gathered batch. The plan of a cost
    C has the kernel exp(-C / epsilon), so similar pairs get the mass (train-CLIP's kernel is
    exp(+C / epsilon): docs/zoo.md)."""
    all_image, all_text = gather_with_grad(teacher_image), gather_with_grad(teacher_text)
    same_modality = teacher_image @ all_image.t() + teacher_text @ all_text.t()   # S_ii + S_tt
    image_to_text = sinkhorn_knopp(same_modality + teacher_image @ all_text.t(), epsilon, iters)
    text_to_image = sinkhorn_knopp(same_modality + teacher_text @ all_image.t(), epsilon, iters)
    return image_to_text, text_to_image


def kl_to_targets(targets, logits):
    """KL(targets || softmax(logits)) per row, averaged over the rows: the KL of distributions,
    from log-probabilities (train-CLIP passed raw logits to F.kl_div at first: docs/zoo.md)."""
    log_probs = F.log_softmax(logits, dim=-1)
    return (torch.xlogy(targets, targets) - targets * log_probs).sum(-1).mean()


class SDCLIPLoss(CLIPLoss):
    """CLIP + self-distillation (Cheng et al. 2021; train-CLIP's CustomCLIPWrapper): the
    student's cosine similarities times a learnable temperature (`sd_logit_scale`) are pulled
    towards Sinkhorn targets from the EMA teacher's embeddings (`*_embed_teacher`) by
    kl_coeff x (KL image->text + KL text->image) / 2, over the global batch."""

    def __init__(self, label_smoothing=0.0, avg_or_sum='avg', kl_coeff=1.0, epsilon=0.05, iters=3):
        super().__init__(label_smoothing, avg_or_sum)
        self.kl_coeff, self.epsilon, self.iters = kl_coeff, epsilon, iters

    def forward(self, out):
        image, text, temperature = out['image_embed'], out['text_embed'], out['sd_logit_scale']
        all_image, all_text = gather_with_grad(image), gather_with_grad(text)
        terms = self.terms(image, text, all_image, all_text, out['logit_scale'])
        target_i2t, target_t2i = self_distillation_targets(
            out['image_embed_teacher'], out['text_embed_teacher'], self.epsilon, self.iters)
        kl_i2t = kl_to_targets(target_i2t, temperature * image @ all_text.t())
        kl_t2i = kl_to_targets(target_t2i, temperature * text @ all_image.t())
        sd_loss = (kl_i2t + kl_t2i) / 2
        return {**terms, 'loss': terms['loss'] + self.kl_coeff * sd_loss, 'sd_loss': sd_loss.detach(),
                'sd_kl_i2t': kl_i2t.detach(), 'sd_kl_t2i': kl_t2i.detach(),
                'sd_logit_scale': temperature.detach()}


class SigLIPLoss(nn.Module):
    """Pairwise sigmoid loss (Zhai et al. 2023): -1/b sum_ij log sigmoid(z_ij (t x_i.y_j + bias)),
    z_ij = 1 on matching pairs, -1 elsewhere; each rank scores its images against all texts."""

    def forward(self, out):
        image, text = out['image_embed'], out['text_embed']
        scale, bias = out['logit_scale'], out['logit_bias']
        labels = local_labels(image)
        logits = scale * image @ gather_with_grad(text).t() + bias           # [b, N*b]
        signs = -torch.ones_like(logits)
        signs[torch.arange(len(labels)), labels] = 1
        loss = -F.logsigmoid(signs * logits).sum() / image.shape[0]
        return {'loss': loss, 'siglip_loss': loss.detach(),
                'clip_acc': retrieval_accuracy(logits.detach(), labels),
                'logit_scale': scale.detach(), 'logit_bias': bias.detach()}

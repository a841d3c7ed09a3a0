"""Losses: one class per method. Each maps the model's output dict to a dict of named terms,
`loss` being the total. Gathering across ranks lives here and keeps the gradient, so that
N processes with batch b give the gradients of one process with batch N*b.
"""
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
        labels = torch.arange(image.shape[0], device=image.device) + utils.get_rank() * image.shape[0]
        logits_per_image = scale * image @ all_text.t()                      # [b, N*b]
        logits_per_text = scale * text @ all_image.t()
        loss_i2t = F.cross_entropy(logits_per_image, labels, label_smoothing=self.label_smoothing)
        loss_t2i = F.cross_entropy(logits_per_text, labels, label_smoothing=self.label_smoothing)
        loss = loss_i2t + loss_t2i
        if self.avg_or_sum == 'avg':
            loss = loss / 2
        with torch.no_grad():
            acc = (logits_per_image.argmax(-1) == labels).float().mean() * 100
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(acc)
                acc /= utils.get_world_size()
        return {'loss': loss, 'clip_loss': loss.detach(), 'loss_i2t': loss_i2t.detach(),
                'loss_t2i': loss_t2i.detach(), 'clip_acc': acc, 'logit_scale': scale.detach()}


LOSSES = {'CLIP': CLIPLoss}


def build_loss(method, args):
    """The loss for a method name (see models.METHODS), configured from the parsed flags."""
    import models
    name = models.METHODS.get(method).loss
    if name == 'CLIP':
        return CLIPLoss(args.label_smoothing, args.loss_avg_or_sum)
    raise ValueError(f"no loss builder for {name!r}; valid: {', '.join(LOSSES)}")

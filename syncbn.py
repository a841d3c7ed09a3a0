"""Batch statistics over all processes: BatchNorm layers (plain, and timm's BatchNorm+activation)
become SyncBatchNorm when a model trains on several processes; on CPU / gloo our own
CPUSyncBatchNorm, since torch.nn.SyncBatchNorm needs CUDA."""
import torch
import torch.nn as nn


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with batch statistics over all processes, differentiably (the sums go through
    torch.distributed.nn's all_reduce, whose backward all-reduces the gradient), for the CPU /
    gloo runs where torch.nn.SyncBatchNorm refuses to run. One process: plain BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x):
        import torch.distributed as dist
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n           # two-pass: exact in fp32
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class CPUSyncBatchNormAct(CPUSyncBatchNorm):
    """timm's BatchNormAct2d (BatchNorm, then its dropout and activation; the OpenAI ResNets'
    norms) with CPUSyncBatchNorm's statistics."""

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def sync_batchnorm(model, device):
    """Every BatchNorm of `model` computes its statistics over all processes: SyncBatchNorm on
    CUDA (timm's converter: plain BatchNorm as PyTorch's, its BatchNorm+activation keeping the
    activation), CPUSyncBatchNorm(Act) elsewhere. Returns the (converted) model."""
    from timm.layers import BatchNormAct2d, convert_sync_batchnorm
    if device.type == 'cuda':
        return convert_sync_batchnorm(model)

    def convert(module):
        plain = type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)   # not other subclasses
        if plain or type(module) is BatchNormAct2d:
            cls = CPUSyncBatchNorm if plain else CPUSyncBatchNormAct
            new = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats)
            for name in ('weight', 'bias'):                   # the same tensors: dtype, device kept
                setattr(new, name, getattr(module, name))
            for name in ('running_mean', 'running_var', 'num_batches_tracked'):
                setattr(new, name, getattr(module, name))
            if not plain:
                new.drop, new.act = module.drop, module.act
            new.train(module.training)
            return new
        for name, child in module.named_children():
            setattr(module, name, convert(child))
        return module
    return convert(model)

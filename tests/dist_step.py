"""One training step's loss and gradients, run under torchrun (tests/test_distributed.py).

    torchrun --nproc_per_node 2 tests/dist_step.py MODEL OUT.pt [flags...]

Every rank builds the same model and the same global batch of 2*b samples, keeps its own
half, runs forward + backward through DDP, and rank 0 saves the rank-averaged loss and the
(all-reduced) gradients (with --update-freq k: over k micro-batches per rank, cached
accumulation). Without torchrun it computes the same on the whole batch in one pass (with
--range-augment: each half augmented as its rank draws it, forward_as_ranks).
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import engine  # noqa: E402
import features  # noqa: E402
import main as train  # noqa: E402
import methods  # noqa: E402
import models  # noqa: E402
import range_augment  # noqa: E402
import syncbn  # noqa: E402
import utils  # noqa: E402
from test_methods import METHOD_CASES  # noqa: E402  (one case per registered method)

GLOBAL_BATCH = 8
# model name + flags: one case per registered method, plus accumulation under DDP and towers
# with BatchNorm (exact across processes through syncbn.sync_batchnorm; RN50OAI: timm's BN+ReLU)
CASES = {**METHOD_CASES,
         'CL2L_ACCUM': ['CL2L_TINYVIT_CL2L', '--update-freq', '2', '--label-smoothing', '0.1'],
         'CL2L_TINYCNN': ['CL2L_TINYCNN_CL2L', '--separate-proj'],
         'CLIP_RN50OAI': ['CLIP_RN50OAI_CLIP', '--image-size', '32', '--transformer-layers', '1',   # BN + ReLU
                          '--transformer-width', '64', '--transformer-heads', '1', '--embed-dim', '32']}


def has_batchnorm(case):
    """Whether the case's model has BatchNorm (its statistics stay per micro-batch, so cached
    accumulation is exact only without it)."""
    args = train.parse_args(['--model', *CASES[case]])
    model = models.create_model_from_flags(args.model, args)
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def global_batch(model, tokenizer, views):
    g = torch.Generator().manual_seed(123)
    size = model.image_size
    n = GLOBAL_BATCH
    batch = {'image': torch.randn(n, 3, size, size, generator=g, dtype=torch.float64),
             'text': tokenizer([f'a caption about thing {i} ' + 'word ' * (i % 5) for i in range(n)])}
    if views:
        batch['image_views'] = torch.randn(n, views, 3, size, size, generator=g, dtype=torch.float64)
        batch['text_views'] = tokenizer([f'view {i} ' + 'x ' * (i % 3) for i in range(n * views)]).view(n, views, -1)
    return batch


def forward_as_ranks(model, batch, ranks, k):
    """The training outputs of `batch` augmented (--range-augment) as `ranks` processes would:
    each starts from the same generator state and augments its share, as k micro-batches in
    order (cached accumulation's first pass), before one forward of the whole batch."""
    start = torch.get_rng_state()
    n = GLOBAL_BATCH // (ranks * k)
    parts = []
    for r in range(ranks):
        torch.set_rng_state(start)
        parts += [model.range_augment.augment_batch({key: v[(r * k + j) * n:(r * k + j + 1) * n]
                                                     for key, v in batch.items()}) for j in range(k)]
    whole = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return {**type(model).forward(model, whole), range_augment.MSE_KEY: whole[range_augment.MSE_KEY]}


def main():
    name, out, *flags = sys.argv[1:]
    args = train.parse_args(['--model', name, *flags])
    utils.init_distributed('gloo')
    rank, world = utils.get_rank(), utils.get_world_size()
    torch.manual_seed(0)
    model = models.create_model_from_flags(args.model, args)
    feats = features.build(args, model, torch.device('cpu'))     # --range-augment: in the model
    model.double()
    views = args.num_augs if args.base == 'CL2L' else 0
    batch = global_batch(model, datasets.Tokenizer(), views)
    b = GLOBAL_BATCH // world
    local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(syncbn.sync_batchnorm(model, torch.device('cpu')))
    loss_fn = features.with_loss_terms(feats, methods.build_loss(args))
    if world == 1 and args.range_augment:             # the draws 2 ranks make, in one pass
        loss = loss_fn(forward_as_ranks(model, batch, 2, args.update_freq))['loss']
        loss.backward()
        loss = loss.detach()
    elif args.update_freq > 1 and world > 1:          # cached accumulation over micro-batches
        k = args.update_freq
        micro = [{key: v[j * b // k:(j + 1) * b // k] for key, v in local.items()} for j in range(k)]
        loss = engine.accumulate_cached(net, loss_fn, micro, torch.amp.GradScaler('cpu', enabled=False),
                                        torch.device('cpu'), 'fp32')['loss']
    else:
        loss = loss_fn(net(local))['loss']
        loss.backward()                               # DDP averages gradients over ranks
        loss = loss.detach()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    if rank == 0:
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.save({'loss': loss, 'grads': grads}, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()

"""One training step's loss and gradients, run under torchrun (tests/test_distributed.py).

    torchrun --nproc_per_node 2 tests/dist_step.py MODEL OUT.pt [flags...]

Every rank builds the same model and the same global batch of 2*b samples, keeps its own
half, runs forward + backward through DDP, and rank 0 saves the rank-averaged loss and the
(all-reduced) gradients. Without torchrun it computes the same on the whole batch.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import losses  # noqa: E402
import main as train  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402

GLOBAL_BATCH = 8


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


def main():
    name, out, *flags = sys.argv[1:]
    args = train.parse_args(['--model', name, *flags])
    utils.init_distributed('gloo')
    rank, world = utils.get_rank(), utils.get_world_size()
    torch.manual_seed(0)
    model = models.create_model_from_flags(args.model, args).double()
    views = args.num_augs if args.base == 'CL2L' else 0
    batch = global_batch(model, datasets.Tokenizer(), views)
    b = GLOBAL_BATCH // world
    local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss = losses.build_loss(args.method, args)(net(local))['loss']
    loss.backward()                                   # DDP averages gradients over ranks
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

"""One epoch of main.py's training loader in each process, run under torchrun by
tests/test_multiscale.py:

    torchrun --nproc_per_node 2 tests/dist_multiscale.py OUT.json [main.py flags...]

Rank 0 writes, per rank, the shape of every batch and the pixel sum of each image."""
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import main as train  # noqa: E402
import utils  # noqa: E402


def main():
    out, *flags = sys.argv[1:]
    args = train.parse_args(flags)
    utils.init_distributed('gloo')
    sampler, loader = datasets.build_loader(datasets.build_train_dataset(args, datasets.Tokenizer()), args)
    sampler.set_epoch(1)
    seen = {'shapes': [], 'pixels': []}
    for batch in loader:
        seen['shapes'].append(list(batch['image'].shape))
        seen['pixels'].append(batch['image'].flatten(1).sum(1).tolist())
    every = [None] * utils.get_world_size()
    dist.all_gather_object(every, seen)
    if utils.get_rank() == 0:
        with open(out, 'w') as f:
            json.dump(every, f)
    dist.destroy_process_group()


if __name__ == '__main__':
    main()

"""The inner training loop: AMP, gradient accumulation, logit-scale clamp, NaN guard,
throughput. `train_one_epoch` returns the epoch's averages."""
import contextlib
import math
import time

import torch

import readers
import utils


def unwrap(model):
    return model.module if hasattr(model, 'module') else model


def cosine_lr(step, total_steps, warmup_steps, lr, lr_start, lr_end):
    """Linear warm-up lr_start -> lr over warmup_steps, then cosine lr -> lr_end."""
    if step < warmup_steps:
        return lr_start + (lr - lr_start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr_end + 0.5 * (lr - lr_end) * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast(device, precision):
    if precision == 'fp32':
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == 'amp' else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TrainState:
    """Where training stands: global optimizer step, epoch, micro-batches done this epoch."""

    def __init__(self, step=0, epoch=0, batch_in_epoch=0, skipped_steps=0):
        self.step, self.epoch, self.batch_in_epoch = step, epoch, batch_in_epoch
        self.skipped_steps = skipped_steps
        self.stop = False

    def as_dict(self):
        return {'step': self.step, 'epoch': self.epoch, 'batch_in_epoch': self.batch_in_epoch,
                'skipped_steps': self.skipped_steps}


def train_one_epoch(model, loss_fn, loader, optimizer, scaler, lr_at, state, args, device,
                    on_step=None):
    """Train from state.batch_in_epoch to the end of the epoch (or until state.stop)."""
    model.train()
    logger = utils.MetricLogger()
    k = args.update_freq
    micro_total = args.steps_per_epoch * k
    header = f'Epoch: [{state.epoch}]'
    samples_per_micro = args.batch_size * utils.get_world_size()
    t0, n_seen = time.time(), 0
    data_log = readers.DataLog(getattr(args, 'max_bad_fraction', 1.0))   # per-batch skip counts
    for i, batch in logger.log_every(loader, micro_total, args.print_freq * k, header,
                                     start=state.batch_in_epoch):
        if i >= micro_total:
            break
        first, last = i % k == 0, (i + 1) % k == 0
        if first:
            lr = lr_at(state.step)
            for group in optimizer.param_groups:
                group['lr'] = lr
        data_log.update(batch.pop('_data', None))
        batch = to_device(batch, device)
        sync = contextlib.nullcontext() if last or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with autocast(device, args.precision):
                terms = loss_fn(model(batch))
            scaler.scale(terms['loss'] / k).backward()
        n_seen += samples_per_micro
        if not last:
            continue
        if not _grads_finite(terms['loss'], optimizer):
            state.skipped_steps += 1
            print(f"non-finite loss or gradient at step {state.step}: step skipped "
                  f"({state.skipped_steps} so far)")
            optimizer.zero_grad(set_to_none=True)
        else:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            unwrap(model).after_step(args.momentum_tau)
        state.step += 1
        state.batch_in_epoch = i + 1
        logger.update(lr=lr, samples_per_s=n_seen / (time.time() - t0),
                      **{name: v for name, v in terms.items()})
        if on_step is not None:
            on_step(terms)
        if state.stop:
            break
    stats = logger.averages()
    stats['samples_per_s'] = n_seen / max(time.time() - t0, 1e-9)
    stats.update(data_log.summary())
    return stats


def _grads_finite(loss, optimizer):
    """False if the loss or any gradient is NaN/inf. With AMP the scaler handles overflow."""
    if not torch.isfinite(loss.detach()).all():
        return False
    grads = [p.grad for g in optimizer.param_groups for p in g['params'] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all())

"""The inner training loop: AMP, gradient accumulation, logit-scale clamp, NaN guard,
throughput. `train_step` is one optimizer step (main.py's and the benchmarks'),
`train_one_epoch` runs an epoch of them and returns the epoch's averages."""
import contextlib
import math
import time

import torch

import readers
import utils
from augment import normalize_uint8


def unwrap(model):
    """The model itself, out of torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, '_orig_mod', model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def cosine_lr(step, total_steps, warmup_steps, lr, lr_start, lr_end):
    """Linear warm-up lr_start -> lr over warmup_steps, then cosine lr -> lr_end."""
    if step < warmup_steps:
        return lr_start + (lr - lr_start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr_end + 0.5 * (lr - lr_end) * (1 + math.cos(math.pi * min(1.0, progress)))


def check_precision(precision, cuda):
    """One-line error for a --precision the device cannot run (`cuda`: the run is on a GPU)."""
    if precision == 'amp' and not cuda:
        raise ValueError("--precision amp needs CUDA; valid on CPU: fp32, bf16")


def autocast(device, precision):
    if precision == 'fp32':
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == 'amp' else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch, device):
    """The batch on `device`. The loaders deliver uint8 images (a quarter of the bytes to pass
    between processes and to copy); `image` / `image_views` become CLIP-normalised float32
    here, one vectorised op per tensor on the device. Float images (already normalised:
    hand-made batches) pass unchanged."""
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if k in ('image', 'image_views') and v.dtype == torch.uint8:
            v = normalize_uint8(v)
        out[k] = v
    return out


class TrainState:
    """Where training stands: global optimizer step, epoch, micro-batches done this epoch."""

    def __init__(self, step=0, epoch=0, batch_in_epoch=0, skipped_steps=0, bad_in_a_row=0):
        self.step, self.epoch, self.batch_in_epoch = step, epoch, batch_in_epoch
        self.skipped_steps, self.bad_in_a_row = skipped_steps, bad_in_a_row
        self.stop = False

    def as_dict(self):
        return {'step': self.step, 'epoch': self.epoch, 'batch_in_epoch': self.batch_in_epoch,
                'skipped_steps': self.skipped_steps, 'bad_in_a_row': self.bad_in_a_row}


def train_one_epoch(model, loss_fn, loader, optimizer, scaler, lr_at, state, args, device,
                    steps_per_epoch, on_step=None, batch_transform=None, after_step=None):
    """Train from state.batch_in_epoch to the end of the epoch (`steps_per_epoch` optimizer
    steps; or until state.stop). `batch_transform`: applied to each batch on the device (e.g.
    text token reduction); `after_step`: the method's hook (see train_step)."""
    model.train()
    logger = utils.MetricLogger()
    k = args.update_freq
    accumulate = ACCUMULATE[getattr(args, 'accum_mode', 'cached') if k > 1 else 'simple']
    micro_total = steps_per_epoch * k
    header = f'Epoch: [{state.epoch}]'
    world = utils.get_world_size()
    t0, n_seen = time.time(), 0
    data_log = readers.DataLog(getattr(args, 'max_bad_fraction', 1.0))   # per-batch skip counts
    micro_batches = []
    for i, batch in logger.log_every(loader, micro_total, args.print_freq * k, header,
                                     start=state.batch_in_epoch):
        if i >= micro_total:
            break
        data_log.update(batch.pop('_data', None))
        batch = to_device(batch, device)
        micro_batches.append(batch_transform(batch) if batch_transform else batch)
        n_seen += len(batch['text']) * world        # --multiscale: the batch varies by step
        if (i + 1) % k:
            continue
        lr = lr_at(state.step)
        for group in optimizer.param_groups:    # a feature's group may scale it (features.py)
            group['lr'] = lr * group.get('lr_scale', 1.0)
        terms, stepped = train_step(model, loss_fn, micro_batches, optimizer, scaler, device,
                                    args.precision, accumulate, after_step)
        micro_batches = []
        if stepped:
            state.bad_in_a_row = 0
        else:
            state.skipped_steps += 1
            state.bad_in_a_row += 1
            print(f"non-finite loss or gradient at step {state.step}: step skipped "
                  f"({state.skipped_steps} so far, {state.bad_in_a_row} in a row)")
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


def train_step(model, loss_fn, micro_batches, optimizer, scaler, device, precision,
               accumulate=None, after_step=None):
    """One optimizer step: forward, loss and backward over the micro-batches (`accumulate`:
    accumulate_simple by default), the non-finite guard, the optimizer step, then the model's
    after_step (logit-scale clamp) and the method's hook `after_step(model)` (e.g. BYOLIP's EMA
    teacher). A step whose loss or gradients are not finite is undone instead: gradients
    dropped, BatchNorm statistics restored. -> (loss terms, whether the step was taken)."""
    accumulate = accumulate or accumulate_simple
    norm_stats = _batchnorm_buffers(unwrap(model))
    terms = accumulate(model, loss_fn, micro_batches, scaler, device, precision)
    if not grads_finite(terms['loss'], optimizer):
        with torch.no_grad():            # a skipped step leaves no trace, BatchNorm stats included
            for buf, saved in norm_stats:
                buf.copy_(saved)
        optimizer.zero_grad(set_to_none=True)
        return terms, False
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    core = unwrap(model)
    core.after_step()
    if after_step is not None:
        after_step(core)
    return terms, True


def _sync_unless(last, model):
    """DDP all-reduces gradients only on the last micro-batch of an update."""
    return contextlib.nullcontext() if last or not hasattr(model, 'no_sync') else model.no_sync()


def accumulate_simple(model, loss_fn, micro_batches, scaler, device, precision):
    """Upstream accumulation: each micro-batch is its own loss (its own negatives), gradients
    of loss / k summed. Returns the micro-batch average of the loss terms."""
    k = len(micro_batches)
    total = {}
    for j, batch in enumerate(micro_batches):
        with _sync_unless(j == k - 1, model):
            with autocast(device, precision):
                terms = loss_fn(model(batch))
            scaler.scale(terms['loss'] / k).backward()
        for name, v in terms.items():
            total[name] = total.get(name, 0) + v.detach() / k
    return total


def accumulate_cached(model, loss_fn, micro_batches, scaler, device, precision):
    """Accumulation with exact negatives: the update equals one step on the k micro-batches
    as a single batch (for models without BatchNorm, whose statistics stay per micro-batch).

    1. Forward every micro-batch without gradient and cache its outputs.
    2. For each micro-batch j: forward it again with gradient (same RNG state, so dropout
       draws the same masks), put it in place of its cached outputs, compute the loss over
       the whole batch, backpropagate. The gradient reaching the parameters through j is
       dL/d(out_j) * d(out_j)/d(theta) at the full batch, so the sum over j is dL/d(theta).
    Outputs that are not per-sample (logit scales, biases) take part live only in the last
    pass, so their gradient is counted once (and DDP sees every parameter in the synced pass).
    Cost: one extra forward per micro-batch. Returns the loss terms of the whole batch."""
    k = len(micro_batches)
    core = unwrap(model)
    rng = []
    with torch.no_grad(), _frozen_batchnorm_stats(core):
        cached = []
        for batch in micro_batches:
            rng.append(_rng_snapshot(device))
            with autocast(device, precision):
                cached.append(_detach(model(batch)))
    after = _rng_snapshot(device)
    for j, batch in enumerate(micro_batches):
        last = j == k - 1
        _rng_restore(rng[j], device)
        with _sync_unless(last, model):
            with autocast(device, precision):
                live = model(batch)
                terms = loss_fn(_splice(cached, j, live, keep_shared=last))
            scaler.scale(terms['loss']).backward()
    _rng_restore(after, device)
    return {name: v.detach() for name, v in terms.items()}


ACCUMULATE = {'cached': accumulate_cached, 'simple': accumulate_simple}


def _splice(cached, j, live, keep_shared):
    """The outputs of all micro-batches concatenated, micro-batch j's live (with gradient).
    0-d tensors (logit scale/bias) are shared: live if keep_shared, else detached."""
    if isinstance(live, dict):
        return {key: _splice([c[key] for c in cached], j, live[key], keep_shared) for key in live}
    if isinstance(live, (list, tuple)):
        return [_splice([c[i] for c in cached], j, v, keep_shared) for i, v in enumerate(live)]
    if not torch.is_tensor(live):
        return live
    if live.dim() == 0:
        return live if keep_shared else live.detach()
    return torch.cat([live if i == j else c for i, c in enumerate(cached)])


def _detach(out):
    if isinstance(out, dict):
        return {key: _detach(v) for key, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_detach(v) for v in out]
    return out.detach() if torch.is_tensor(out) else out


def _rng_snapshot(device):
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == 'cuda' else None)


def _rng_restore(snapshot, device):
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)


@contextlib.contextmanager
def _frozen_batchnorm_stats(model):
    """BatchNorm running statistics untouched by the gradient-free pass (momentum 0 and the
    batch counter restored): each micro-batch updates them once, in its live pass."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and m.momentum is not None]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _batchnorm_buffers(model):
    """(buffer, copy) of every BatchNorm running statistic, to undo a skipped step."""
    return [(b, b.detach().clone()) for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


def grads_finite(loss, optimizer):
    """False if the loss or any gradient is NaN/inf. With AMP the scaler handles overflow."""
    if not torch.isfinite(loss.detach()).all():
        return False
    grads = [p.grad for g in optimizer.param_groups for p in g['params'] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all())

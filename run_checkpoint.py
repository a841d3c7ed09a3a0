"""main.py's checkpoints: what a training checkpoint holds, writing it (atomically, rotated,
with its digest: checkpoint.py), finding the one to resume from and restoring the run from it,
and --finetune's weights."""
import os

import torch

import checkpoint
import engine
import features
import models
import rundir
import utils


def plain_args(args):
    """The flags as JSON-able values (tuples as lists), as checkpoints and args.json keep them."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


class RunCheckpoints:
    """Saving and resuming one training run: the model, optimizer, AMP scaler, the enabled
    training features' states (features.py), the train state and the random generators."""

    def __init__(self, args, model, optimizer, scaler, feats):
        self.args, self.model, self.optimizer, self.scaler, self.feats = args, model, optimizer, scaler, feats

    def save(self, path, state, best, keep=1):
        """Write a checkpoint (`best`: {'top1', 'weights'} of the best validation so far, or None);
        a failed write (disk full) stops the run with the earlier checkpoints intact."""
        try:
            checkpoint.save_on_master(self._contents(state, best), path, keep)
        except checkpoint.CheckpointWriteError as e:
            raise SystemExit(f"main.py: error: {e}; free some space and rerun the same command to resume") from None

    def _contents(self, state, best):
        best = best or {}
        return {
            'model': engine.unwrap(self.model).state_dict(), 'optimizer': self.optimizer.state_dict(),
            'scaler': self.scaler.state_dict(), 'epoch': state.epoch, 'step': state.step,
            'state': state.as_dict(), 'args': plain_args(self.args), 'model_name': self.args.model,
            'rng': utils.rng_state(), 'rng_ranks': utils.all_rng_states(),
            'best_top1': best.get('top1'), 'best_weights': best.get('weights'),
            'features': features.state_dicts(self.feats)}

    def resume(self, parser):
        """Load the checkpoint to resume from, if any -> (TrainState, best or None)."""
        args = self.args
        path, ckpt = load_resume_checkpoint(args)
        if ckpt is None:
            return engine.TrainState(), None
        if ckpt.get('model_name') != args.model:
            raise SystemExit(f"main.py: error: checkpoint {path} holds a {ckpt.get('model_name')} "
                             f"model, not {args.model}; pass --model {ckpt.get('model_name')} "
                             f"or another --output-dir")
        rundir.check_resume_args(ckpt, args, path, parser)   # same run: same meaning
        self.model.load_state_dict(ckpt['model'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        self.scaler.load_state_dict(ckpt['scaler'])
        features.load_state_dicts(self.feats, ckpt.get('features') or {})
        state = engine.TrainState(**ckpt['state'])
        restore_rng(ckpt, args.seed, state.step)
        print(f"resumed from {path}: epoch {state.epoch}, step {state.step}, "
              f"batch {state.batch_in_epoch} of the epoch")
        best = ckpt.get('best_top1')
        return state, (None if best is None else {'top1': best, 'weights': ckpt.get('best_weights') or 'live'})


def restore_rng(ckpt, seed, step):
    """Each process's random generators as the checkpoint saved them."""
    per_rank = ckpt.get('rng_ranks') or []
    if len(per_rank) == utils.get_world_size():
        utils.set_rng_state(per_rank[utils.get_rank()])        # each process its own generators
    elif utils.get_world_size() == 1:
        utils.set_rng_state(ckpt['rng'])
    else:       # another number of processes: distinct, reproducible streams per rank
        print(f"note: the checkpoint has random states for {len(per_rank) or 1} process(es), not "
              f"{utils.get_world_size()}: reseeding each process from --seed, rank and step")
        utils.seed_everything(seed + utils.get_rank() + 7919 * step)


def load_resume_checkpoint(args):
    """-> (path, verified main.py checkpoint) of --resume, or the newest good one of output-dir,
    or (None, None) for a fresh run; anything unusable stops the run with one line."""
    if args.resume:
        try:
            return args.resume, require_training_checkpoint(checkpoint.load_checkpoint(args.resume),
                                                            args.resume)
        except checkpoint.CheckpointError as e:
            raise SystemExit(f"main.py: error: --resume: {e}") from None
    latest = os.path.join(args.output_dir, 'checkpoint.pt')
    candidates = checkpoint.rotated_paths(latest, max(1, args.keep_checkpoints))
    for p in candidates:
        if os.path.exists(p) and not os.path.isfile(p):
            raise SystemExit(f"main.py: error: {p} is not a file (a directory?); move it away, "
                             f"or pass --resume FILE or another --output-dir")
    ckpt, path = checkpoint.load_latest_good(latest, args.keep_checkpoints)
    if ckpt is None and any(os.path.isfile(p) for p in candidates):
        raise SystemExit(f"main.py: error: no readable checkpoint among {', '.join(candidates)}; "
                         f"pass --resume FILE or another --output-dir")
    return path, (require_training_checkpoint(ckpt, path) if ckpt is not None else None)


def require_training_checkpoint(ckpt, path):
    """`ckpt` if main.py can resume it, else SystemExit saying what the file is and what to pass."""
    if isinstance(ckpt, dict) and all(k in ckpt for k in ('model', 'model_name', 'optimizer', 'scaler', 'state')):
        return ckpt
    what = checkpoint.describe(ckpt)
    if isinstance(ckpt, dict) and ckpt.get('kind') == checkpoint.FINETUNE_KIND:
        hint = "resume it with finetune_classification.py --resume"
    elif isinstance(ckpt, dict) and ('model' in ckpt or what.startswith('a plain state dict')):
        hint = f"to train from its weights pass --finetune {path} (and no --resume)"
    else:
        hint = "pass a checkpoint.pt written by main.py"
    raise SystemExit(f"main.py: error: {path} is {what}, not a main.py checkpoint to resume; {hint}")


def load_finetune_weights(model, path):
    """--finetune: the weights of a main.py / interop.py checkpoint (or a plain state dict) into
    `model`, position embeddings resampled -> (loaded, skipped, missing); else one line."""
    try:
        ckpt = checkpoint.load_checkpoint(path)
        state = ckpt.get('model') if isinstance(ckpt, dict) and 'model_name' in ckpt else ckpt
        if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())):
            raise ValueError(f"{path} is {checkpoint.describe(ckpt)}; pass a checkpoint written by "
                             f"main.py or interop.py import, or a state dict")
        return models.load_weights(model, state)
    except ValueError as e:
        raise SystemExit(f"main.py: error: --finetune: {e}") from None

"""Training curves: loss per logged step and zero-shot top-1 per epoch, from the run's logs.

    python plots.py OUTPUT_DIR      # writes OUTPUT_DIR/curves.png
"""
import json
import os
import sys


def read_jsonl(path):
    """The records of a JSON-lines log; a line cut by a killed process is skipped."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def training_curves(output_dir):
    """Write output_dir/curves.png; returns its path."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps = read_jsonl(os.path.join(output_dir, 'log_steps.txt'))
    epochs = read_jsonl(os.path.join(output_dir, 'log.txt'))
    ranges = sorted({k for r in steps for k in r if k.startswith('range_augment_') and k.endswith(('_min', '_max'))})
    fig, axes = plt.subplots(1, 3 if ranges else 2, figsize=(15 if ranges else 10, 4))
    ax_loss, ax_acc = axes[:2]
    ax_loss.plot([r['step'] for r in steps], [r['loss'] for r in steps])
    ax_loss.set(xlabel='optimizer step', ylabel='training loss', title='loss')
    for key in sorted({k for r in epochs for k in r if k.endswith('_top1')}):
        rows = [r for r in epochs if key in r]
        ax_acc.plot([r['epoch'] for r in rows], [r[key] for r in rows], marker='o', label=key)
    ax_acc.set(xlabel='epoch', ylabel='top-1 (%)', title='zero-shot accuracy', ylim=(0, 100))
    if ax_acc.lines:
        ax_acc.legend()
    if ranges:
        _range_panel(axes[2], steps, ranges)
    fig.tight_layout()
    path = os.path.join(output_dir, 'curves.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _range_panel(ax, steps, keys):
    """RangeAugment's learned ranges per logged step: one band per op, its ends as lines."""
    ops = sorted({k[len('range_augment_'):].rsplit('_', 1)[0] for k in keys})
    for key in keys:
        rows = [r for r in steps if key in r]
        op = key[len('range_augment_'):].rsplit('_', 1)[0]
        ax.plot([r['step'] for r in rows], [r[key] for r in rows], color=f'C{ops.index(op)}',
                linestyle='-' if key.endswith('_max') else '--', label=f'{op} {key[-3:]}')
    ax.set(xlabel='optimizer step', ylabel='magnitude', yscale='log', title='RangeAugment ranges')
    ax.legend(fontsize='small')


if __name__ == '__main__':
    print(training_curves(sys.argv[1]))

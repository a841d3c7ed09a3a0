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
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r['step'] for r in steps], [r['loss'] for r in steps])
    ax_loss.set(xlabel='optimizer step', ylabel='training loss', title='loss')
    for key in sorted({k for r in epochs for k in r if k.endswith('_top1')}):
        rows = [r for r in epochs if key in r]
        ax_acc.plot([r['epoch'] for r in rows], [r[key] for r in rows], marker='o', label=key)
    ax_acc.set(xlabel='epoch', ylabel='top-1 (%)', title='zero-shot accuracy', ylim=(0, 100))
    if ax_acc.lines:
        ax_acc.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, 'curves.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == '__main__':
    print(training_curves(sys.argv[1]))

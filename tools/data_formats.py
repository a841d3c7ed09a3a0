"""Print the docs' data-format section from the registry (datasets.DATASETS): one table row per
`--dataset` format (what it is, the flags it needs, its own flags) and the layout each one
expects, word for word as its start-up errors print it (tests/test_data_registry.py checks
that docs/data.md shows every layout).

    python tools/data_formats.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402


def _codes(items):
    return ', '.join(f'`{x}`' for x in items) or '–'


def section():
    alias_of = {}
    for alias, name in datasets.aliases().items():
        alias_of.setdefault(name, []).append(alias)
    lines = ['| `--dataset` | format | needs | its own flags |', '|---|---|---|---|']
    for name, spec in datasets.DATASETS.items():
        label = f'`{name}`' + (f" (alias {_codes(alias_of[name])})" if name in alias_of else '')
        needs = ['--root'] * spec.needs_root + ['--metadata'] * spec.needs_metadata
        lines.append(f'| {label} | {spec.summary} | {_codes(needs)} | {_codes(f for f, _ in spec.flags())} |')
    lines += ['', 'The layout each format expects (a start-up error quotes it):', '']
    lines += [f'- `{name}`: `{spec.layout}`' for name, spec in datasets.DATASETS.items()]
    return '\n'.join(lines)


if __name__ == '__main__':
    print(section())

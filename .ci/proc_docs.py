"""Run what `make book` runs before Quarto — nbdev's processing of every notebook — on a temporary copy.

    python .ci/proc_docs.py [nbs/02_text.ipynb ...] [--keep DIR]   # --keep: leave the processed notebooks in DIR

nbdev's doc processing executes every exported cell, every `show_doc`, and every cell that mixes imports with
other code (whatever its `slow`/`net` flags say). This script fails on any error in that processing and on nbdev's
"Found cells containing imports and other code" warning, so the book's build is checked on every submission even
where Quarto is not installed. The processed notebooks are checked too: signature blocks hold no markdown links, and
no link points at the published site (a local build must navigate within itself).
"""
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIXED = 'Found cells containing imports and other code'


def copy_project(dest: Path) -> None:
    "The files nbdev's processing reads: settings, the notebooks (with _quarto.yml resolved) and the package index."
    shutil.copy2(ROOT/'settings.ini', dest/'settings.ini')
    shutil.copy2(ROOT/'_quarto.yml', dest/'_quarto.yml')
    shutil.copytree(ROOT/'nbs', dest/'nbs', symlinks=False,
                    ignore=shutil.ignore_patterns('.ipynb_checkpoints', 'sidebar.yml', 'nbdev.yml'))


def linked_signatures(nb: dict) -> list[str]:
    "Signature blocks (show_doc's code blocks) that contain markdown links: they would render raw."
    out = []
    for c in nb['cells']:
        for o in c.get('outputs', []):
            md = ''.join(o.get('data', {}).get('text/markdown', ''))
            for block in re.findall(r'```python\n(.*?)```', md, re.S):
                if re.search(r'\[`?[\w.]+`?\]\(', block):
                    out.append(block.strip().splitlines()[0])
    return out


def absolute_site_links(nb: dict, site: str) -> int:
    return sum(json.dumps(c).count(site) for c in nb['cells'])


def main(chosen: list[str], keep: Path | None = None) -> int:
    from nbdev.config import get_config
    from nbdev.processors import FilterDefaults
    from nbdev.quarto import refresh_quarto_yml
    import nbdev.serve_drv

    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        copy_project(tmp)
        os.chdir(tmp)
        get_config.cache_clear() if hasattr(get_config, 'cache_clear') else None
        refresh_quarto_yml()
        import yaml
        site = yaml.safe_load((ROOT/'_quarto.yml').read_text())['book']['site-url'].split('//')[-1].split('/')[0]
        proc = tmp/'_proc'
        proc.mkdir()
        nbs = [tmp/'nbs'/Path(p).name for p in chosen] or sorted(p for p in (tmp/'nbs').glob('*.ipynb')
                                                                  if not p.name.startswith('_'))
        for nb in nbs:
            t = time.time()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                try:
                    nbdev.serve_drv.main((nb, proc/nb.name, FilterDefaults))
                except Exception as e:
                    cause = e.__cause__ or e
                    failures.append(f'{nb.name}: {e}\n' + ''.join(traceback.format_exception_only(type(cause), cause)))
                    print(f'FAIL {nb.name}', flush=True)
                    continue
            mixed = [str(w.message) for w in caught if MIXED in str(w.message)]
            failures += [f'{nb.name}: {m}' for m in mixed]
            if keep:
                shutil.copy2(proc/nb.name, keep/nb.name)
            out = json.loads((proc/nb.name).read_text())
            failures += [f'{nb.name}: a signature block holds markdown links: {s}' for s in linked_signatures(out)]
            if n := absolute_site_links(out, site):
                failures.append(f'{nb.name}: {n} links point at the published site ({site}), not within the book')
            print(f'{"ok  " if not mixed else "WARN"} {nb.name} ({time.time() - t:.0f}s)', flush=True)
        os.chdir(ROOT)
    for f in failures:
        print('\n' + f, file=sys.stderr)
    if failures:
        print(f'\nnbdev doc processing: {len(failures)} problem(s)', file=sys.stderr)
    return 1 if failures else 0


if __name__ == '__main__':
    args = sys.argv[1:]
    keep = Path(args.pop(args.index('--keep') + 1)) if '--keep' in args else None
    args = [a for a in args if a != '--keep']
    sys.exit(main(args, keep))

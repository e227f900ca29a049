"""Execute notebooks in place so that the book shows real, current outputs.

    python .ci/execute_nbs.py nbs/02_text.ipynb [more notebooks] [--skip net gpu]

Every code cell runs top to bottom in one kernel, slow cells included (their stored outputs are the
"real run" the book shows). Cells flagged with a name given to --skip are not run and keep the outputs
they already have. With --only-slow ID..., the slow cells whose ids are given run and the other slow
cells keep their outputs (to add one slow cell without repeating a long run; the ids are the notebook's
cell ids). A failing cell stops the run and nothing is written.
"""
import argparse
import os
import sys
import time
from pathlib import Path

from book_report import directives  # the same reading of a cell's #| lines as the page checks
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell


def flags(cell):
    "The nbdev directives at the top of a code cell, e.g. {'export', 'slow'}."
    return directives(cell.source)


def execute(path: Path, skip: set[str], only_slow: set[str] | None = None) -> None:
    nb = read_nb(path)
    shell = CaptureShell(path)
    shell.set_path(str(path.parent.resolve()))
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != 'code' or flags(cell) & skip:
                continue
            if only_slow is not None and 'slow' in flags(cell) and cell.get('id') not in only_slow:
                continue
            t = time.time()
            cell.outputs = []
            shell.cell(cell)
            if shell.exc:
                sys.stderr.write(shell.prettytb(fname=path) + '\n')
                raise SystemExit(f'{path}: cell {i} failed; notebook not written')
            if time.time() - t > 20:
                print(f'  cell {i}: {time.time() - t:.0f}s', flush=True)
    finally:
        os.chdir(cwd)
    count = 0
    for cell in nb.cells:
        if cell.cell_type == 'code':
            count += 1
            cell.execution_count = count
            for o in cell.get('outputs', []):
                if 'execution_count' in o:
                    o['execution_count'] = count
    # authoring tools (jupytext) leave their own metadata; a notebook of this book carries only its kernel
    nb.metadata = {'kernelspec': {'display_name': 'Python 3 (ipykernel)', 'language': 'python', 'name': 'python3'}}
    write_nb(nb, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('notebooks', nargs='+', type=Path)
    ap.add_argument('--skip', nargs='*', default=['net', 'gpu'], help='flags of cells not to run (default: net gpu)')
    ap.add_argument('--only-slow', nargs='+', default=None, metavar='ID', help='run only these slow cells (by cell id)')
    a = ap.parse_args()
    for p in a.notebooks:
        t = time.time()
        print(f'executing {p}', flush=True)
        execute(p, set(a.skip), set(a.only_slow) if a.only_slow else None)
        print(f'  done in {time.time() - t:.0f}s', flush=True)


if __name__ == '__main__':
    main()

"""What a reader of each page meets, measured: prose against code, long cells, chapter endings, signatures.

    python .ci/book_report.py [nbs/02_text.ipynb ...]     # a table; exit 1 when a page misses a bar

tests/test_book.py asserts the same bars, so the book cannot drift below them unnoticed.
"""
import ast
import io
import json
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'

# Main chapters explain at least 0.8 characters of prose per character of code; every other page 0.5.
MAIN_CHAPTERS = {'02_text', '03_attention', '04_gpt', '05_pretrain', '06_classify', '07_instruct'}
MAIN_RATIO, OTHER_RATIO = 0.8, 0.5
MAX_CELL_LINES = 60
# Phrases that speak about the work on the project instead of to the reader.
WORK_PHRASES = re.compile(r'target[^.\n]{0,20}: met|\bnot met\b|still to come|the issue (asks|says)|\bissue \d+|'
                          r'work in progress|\bTODO\b|\bthis session\b', re.I)
_import = re.compile(r'^\s*(from\s+\S+\s+)?import\s')


def cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text())['cells']


def source(cell: dict) -> str:
    return ''.join(cell['source'])


def directives(src: str) -> set[str]:
    out = set()
    for line in src.splitlines():
        m = re.match(r'^\s*#\|\s*([\w-]+)', line)
        if not m:
            break
        out.add(m.group(1))
    return out


def prose_ratio(nb: Path) -> float:
    "Characters of markdown per character of code (sources only)."
    cs = cells(nb)
    md = sum(len(source(c)) for c in cs if c['cell_type'] == 'markdown')
    code = sum(len(source(c)) for c in cs if c['cell_type'] == 'code')
    return md / max(code, 1)


def long_cells(nb: Path) -> list[tuple[int, int]]:
    "(cell index, lines) of code cells longer than MAX_CELL_LINES."
    return [(i, n) for i, c in enumerate(cells(nb)) if c['cell_type'] == 'code'
            and (n := len(source(c).splitlines())) > MAX_CELL_LINES]


def mixed_import_cells(nb: Path) -> list[int]:
    "Cells nbdev's doc build would execute because they mix imports with other code (exported cells run anyway)."
    out = []
    for i, c in enumerate(cells(nb)):
        src = source(c)
        if c['cell_type'] != 'code' or directives(src) & {'export', 'exports', 'exporti', 'exec_doc'}:
            continue
        lines = [ln for ln in src.splitlines() if ln.strip() and not ln.lstrip().startswith(('#', '%', '!'))]
        imports = [ln for ln in lines if _import.match(ln)]
        if imports and len(imports) < len(lines):
            out.append(i)
    return out


def linked_signature_comments(nb: Path) -> list[str]:
    "Parameter comments in exported signatures that hold backticks (nbdev turns them into raw markdown links)."
    out = []
    for c in cells(nb):
        src = source(c)
        if c['cell_type'] != 'code' or not directives(src) & {'export', 'exports'}:
            continue
        code = '\n'.join('' if ln.lstrip().startswith(('#|', '%')) else ln for ln in src.splitlines())
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        spans = [(n.lineno, n.body[0].lineno) for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.body]
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type == tokenize.COMMENT and '`' in tok.string and any(a <= tok.start[0] < b for a, b in spans):
                out.append(tok.line.strip())
    return out


def work_phrases(nb: Path) -> list[str]:
    "Sentences in the prose that speak about the project's work rather than to the reader."
    return [m.group(0) for c in cells(nb) if c['cell_type'] == 'markdown' for m in WORK_PHRASES.finditer(source(c))]


def headings(nb: Path) -> list[str]:
    return [ln[3:].strip() for c in cells(nb) if c['cell_type'] == 'markdown'
            for ln in source(c).splitlines() if ln.startswith('## ')]


def chapter_ending(nb: Path) -> list[str]:
    "What a page lacks of its ending: a Summary and Exercises (the preface has neither)."
    if nb.stem == 'index':
        return []
    hs = headings(nb)
    return [h for h in ('Summary', 'Exercises') if h not in hs]


def pages() -> list[Path]:
    return sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith('_'))


def problems(nb: Path) -> list[str]:
    out = []
    bar = MAIN_RATIO if nb.stem in MAIN_CHAPTERS else OTHER_RATIO
    if nb.stem != 'index' and (r := prose_ratio(nb)) < bar:
        out.append(f'prose ratio {r:.2f} < {bar}')
    out += [f'cell {i} has {n} lines' for i, n in long_cells(nb)]
    out += [f'cell {i} mixes imports with code' for i in mixed_import_cells(nb)]
    out += [f'signature comment with backticks: {s}' for s in linked_signature_comments(nb)]
    out += [f'work-tracking phrase: {s!r}' for s in work_phrases(nb)]
    out += [f'no "## {h}"' for h in chapter_ending(nb)]
    return out


if __name__ == '__main__':
    chosen = [Path(a) for a in sys.argv[1:]] or pages()
    bad = 0
    for nb in chosen:
        ps = problems(nb)
        bad += bool(ps)
        print(f'{nb.stem:26s} ratio {prose_ratio(nb):.2f}  ' + ('ok' if not ps else '; '.join(ps)))
    sys.exit(1 if bad else 0)

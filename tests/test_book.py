"The book's structure: _quarto.yml, the notebooks, the README and the test flags hold together."
import ast
import configparser
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'


def quarto():
    return yaml.safe_load((ROOT/'_quarto.yml').read_text())


def chapters(items):
    "Every file named in a book's chapters list, parts included, in order."
    for item in items:
        if isinstance(item, str):
            yield item
        elif 'part' in item:
            if str(item['part']).endswith(('.qmd', '.ipynb', '.md')):
                yield item['part']
            yield from chapters(item.get('chapters', []))
        else:
            yield item['href']


def test_quarto_yml_is_a_book():
    q = quarto()
    assert q['project']['type'] == 'book'
    assert q['project']['output-dir'] == '_site'
    assert q['book']['title'] == 'Build a Large Language Model (From Scratch)'
    assert q['book']['search'] is True
    html = q['format']['html']
    assert html['code-copy'] is True and html['code-tools'] is True
    assert q['execute']['enabled'] is False, 'the book must show stored outputs, not re-execute'


def test_every_notebook_listed_exactly_once():
    listed = list(chapters(quarto()['book']['chapters']))
    assert listed[0] == 'index.ipynb', 'the preface comes first'
    dupes = {c for c in listed if listed.count(c) > 1}
    assert not dupes, f'listed more than once: {dupes}'
    missing = [c for c in listed if not (NBS/c).is_file()]
    assert not missing, f'listed in _quarto.yml but not in nbs/: {missing}'
    notebooks = {p.name for p in NBS.glob('*.ipynb') if not p.name.startswith('_')}
    unlisted = notebooks - set(listed)
    assert not unlisted, f'notebooks missing from _quarto.yml: {sorted(unlisted)}'


def test_parts_in_reading_order():
    parts = [item['part'] for item in quarto()['book']['chapters'] if isinstance(item, dict)]
    order = ['Building an LLM', 'Pretraining', 'Fine-tuning', 'Modern architectures', 'Reference']
    assert parts == [p for p in order if p in parts], parts
    assert parts[0] == 'Building an LLM' and parts[-1] == 'Reference'


def test_nbs_quarto_yml_is_the_top_level_file():
    "nbdev reads nbs/_quarto.yml: it must be a link to the one file people edit, not a second copy."
    link = NBS/'_quarto.yml'
    assert link.is_symlink() and link.resolve() == (ROOT/'_quarto.yml').resolve()


def test_test_flags_are_space_separated():
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT/'settings.ini')
    flags = cfg['DEFAULT']['tst_flags'].split()
    assert {'slow', 'net', 'gpu'} <= set(flags), flags
    assert not any('|' in f for f in flags)


def test_nbdev_really_skips_flagged_cells(tmp_path):
    "A failing cell flagged slow, net or gpu is skipped by nbdev_test; the same cell unflagged fails it."
    def run(flag):
        src = (f'#| {flag}\n' if flag else '') + 'raise RuntimeError("this cell must not run")'
        nb = {'cells': [{'cell_type': 'code', 'metadata': {}, 'source': src, 'outputs': [], 'execution_count': None}],
              'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}
        p = tmp_path/f'flagcheck_{flag}.ipynb'
        p.write_text(json.dumps(nb))
        return subprocess.run(['nbdev_test', '--path', str(p)], cwd=ROOT, capture_output=True, text=True)
    for flag in ['slow', 'net', 'gpu']:
        r = run(flag)
        assert r.returncode == 0 and 'Success' in r.stdout, f'the #| {flag} cell was run: {r.stderr[-500:]}'
    assert run(None).returncode != 0, 'an unflagged failing cell must fail nbdev_test'


def test_readme_is_generated_from_index():
    r = subprocess.run([sys.executable, '.ci/readme.py', '--check'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_page_opens_and_closes_like_a_chapter():
    "Title and one-line description first; chapters end with a summary."
    for p in sorted(NBS.glob('*.ipynb')):
        if p.name.startswith('_'):
            continue
        cells = json.loads(p.read_text())['cells']
        first = ''.join(cells[0]['source'])
        assert first.startswith('# ') and '\n> ' in first, f'{p.name} must open with "# Title" and "> description"'
        md = [''.join(c['source']) for c in cells if c['cell_type'] == 'markdown']
        if p.name[:2].isdigit() and p.name[:2] not in ('00', '90', '91', '99'):
            assert any(m.startswith('## Summary') for m in md), f'{p.name} has no "## Summary"'
            assert any(m.startswith('## Exercises') for m in md), f'{p.name} has no "## Exercises"'


def test_notebooks_carry_outputs():
    "The book shows stored outputs: every notebook with code has been executed before committing."
    for p in sorted(NBS.glob('*.ipynb')):
        if p.name.startswith('_'):
            continue
        cells = [c for c in json.loads(p.read_text())['cells'] if c['cell_type'] == 'code']
        if any(c.get('outputs') for c in cells) or not cells:
            continue
        shown = [c for c in cells if not ''.join(c['source']).lstrip().startswith(('#| export', '#| hide', '#| default_exp'))]
        assert not shown, f'{p.name} has no stored outputs: execute it (python .ci/execute_nbs.py) before committing'


# --- What a reader meets on every page, and what a fresh install needs (.ci/book_report.py measures it) ---
sys.path.insert(0, str(ROOT/'.ci'))
import book_report  # noqa: E402


@pytest.mark.parametrize('page', [p.name for p in book_report.pages()])
def test_page_meets_the_book_bars(page):
    "Prose ratio, cell length, imports in their own cells, plain signatures, reader-facing prose, Summary and Exercises."
    problems = book_report.problems(NBS/page)
    assert not problems, f'{page}: ' + '; '.join(problems)


def test_map_titles_are_the_page_titles():
    "The home page's map names each page as its own title (and so the sidebar) does."
    index = ''.join(''.join(c['source']) for c in json.loads((NBS/'index.ipynb').read_text())['cells']
                    if c['cell_type'] == 'markdown')
    links = {f: t for t, f in re.findall(r'^\| \[([^\]]+)\]\(([\w.]+\.ipynb)\)', index, re.M)}
    pages = {p.name for p in book_report.pages()} - {'index.ipynb'}
    assert set(links) == pages, f'map and pages differ: {set(links) ^ pages}'
    for f, title in links.items():
        first = ''.join(json.loads((NBS/f).read_text())['cells'][0]['source']).splitlines()[0]
        assert first == f'# {title}', f'{f}: the map says {title!r}, the page {first!r}'


def test_quarto_css_is_shipped_with_the_notebooks():
    css = quarto()['format']['html']['css']
    assert (NBS/css).is_file(), f'{css} must live in nbs/, from where nbdev copies it next to _quarto.yml'


def _imports(src: str) -> set[str]:
    "Top-level names of every module imported in a source, inside functions too."
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return set()
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name.split('.')[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            out.add(n.module.split('.')[0])
        elif isinstance(n, ast.Call) and getattr(n.func, 'attr', getattr(n.func, 'id', '')) == 'import_module' \
                and n.args and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str):
            if not n.args[0].value.startswith('.'):
                out.add(n.args[0].value.split('.')[0])
    return out


def _declared(key: str) -> set[str]:
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT/'settings.ini')
    return {canonicalize_name(re.split(r'[<>=!~\[ ;]', r)[0]) for r in cfg['DEFAULT'].get(key, '').split()}


def _undeclared(sources: list[str], declared: set[str]) -> dict[str, list[str]]:
    local = {'llm_from_scratch', 'conftest', 'tiny_models', 'common', 'book_report'}
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for name in sorted(set().union(*map(_imports, sources)) - local - set(sys.stdlib_module_names)):
        provided_by = {canonicalize_name(d) for d in dists.get(name, [])}
        if not provided_by & declared:
            missing[name] = sorted(provided_by) or ['(not installed)']
    return missing


def _notebook_code() -> list[str]:
    out = []
    for p in NBS.glob('*.ipynb'):
        for c in json.loads(p.read_text())['cells']:
            if c['cell_type'] == 'code':
                src = ''.join(c['source'])
                out.append('\n'.join('' if ln.lstrip().startswith(('%', '!')) else ln for ln in src.splitlines()))
    return out


def test_package_imports_are_declared_requirements():
    "Everything the package imports is a core requirement (TensorFlow, imported lazily, is the tf extra)."
    srcs = [p.read_text() for p in (ROOT/'llm_from_scratch').glob('*.py')]
    missing = _undeclared(srcs, _declared('requirements') | _declared('tf_requirements'))
    assert not missing, f'the package imports modules that settings.ini does not require: {missing}'


def test_notebook_test_and_bench_imports_are_declared():
    "What the notebooks, tests and benchmarks import is declared (core, dev or tf), so a fresh install runs them."
    srcs = _notebook_code() + [p.read_text() for d in ('tests', 'bench', '.ci') for p in (ROOT/d).glob('*.py')]
    declared = _declared('requirements') | _declared('dev_requirements') | _declared('tf_requirements')
    missing = _undeclared(srcs, declared)
    assert not missing, f'imported but not declared in settings.ini: {missing}'


def test_diagrams_are_laid_out_top_down():
    "A left-to-right flowchart is scaled down to the column, its labels to 7-9 px; top-down ones keep body-text size."
    for p in book_report.pages():
        for c in json.loads(p.read_text())['cells']:
            for kind in re.findall(r'```\{mermaid\}\s*\n\s*(?:%%.*\n\s*)*(\w+\s+\w+)', ''.join(c['source'])):
                assert kind.split()[0] != 'flowchart' or kind.split()[1] in ('TD', 'TB'), f'{p.name}: {kind}'

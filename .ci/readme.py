"""Write README.md from nbs/index.ipynb (the book's preface), without needing Quarto.

    python .ci/readme.py           # write README.md
    python .ci/readme.py --check   # exit 1 if README.md is out of date

Markdown cells are copied as they are; code cells become fenced Python blocks followed by their
stored text output; `#| hide` cells are left out. Links to notebooks point into nbs/.
"""
import json
import re
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent


def render(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text(encoding='utf-8'))
    parts = ['<!-- Generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file. -->']
    for cell in nb['cells']:
        src = ''.join(cell['source']).strip()
        if not src:
            continue
        if cell['cell_type'] == 'markdown':
            src = re.sub(r'^> (.*)$', r'*\1*', src, count=1, flags=re.M) if src.startswith('# ') else src
            parts.append(re.sub(r'\]\((?!https?:)([\w.-]+\.ipynb)\)', r'](nbs/\1)', src))
        elif cell['cell_type'] == 'code':
            if re.match(r'\s*#\|\s*(hide|default_exp)', src):
                continue
            parts.append(f'```python\n{src}\n```')
            text = ''.join(''.join(o.get('text', '')) or ''.join(o.get('data', {}).get('text/plain', ''))
                           for o in cell.get('outputs', []))
            if text.strip():
                parts.append(f'```\n{text.rstrip()}\n```')
    return '\n\n'.join(parts) + '\n'


def main():
    text = render(root/'nbs'/'index.ipynb')
    readme = root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text(encoding='utf-8') != text:
            sys.exit('README.md is out of date with nbs/index.ipynb: run `python .ci/readme.py`')
        return
    readme.write_text(text, encoding='utf-8')


if __name__ == '__main__':
    main()

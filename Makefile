# The two commands of the README: `make book` and `make test`.
SHELL := /bin/bash
STAGE := bash .ci/stage.sh
PYTHON ?= python3
PKG := llm_from_scratch

.PHONY: book test install export export-check lint nbtest docs-check pytest readme clean

## make book: export the package and render the book into _site/ (needs Quarto)
book: install export
	@command -v quarto >/dev/null || { nbdev_install_quarto >/tmp/llm-from-scratch-quarto.log 2>&1; command -v quarto >/dev/null; } \
	  || { echo "make book: Quarto is not installed and could not be installed here (offline, or no sudo): install it from https://quarto.org/docs/get-started/ and run make book again."; exit 1; }
	$(STAGE) "render the book" nbdev_docs
	$(PYTHON) .ci/readme.py

## make test: install, check the package matches the notebooks, lint, run every notebook, process them as the book
## build does (everything `make book` does before Quarto), run tests/
test: install export-check lint nbtest docs-check pytest

install:
	@$(STAGE) "install" $(PYTHON) -m pip install -q -e ".[dev]"

export:
	nbdev_export
	$(PYTHON) .ci/readme.py

export-check:
	@$(STAGE) "package matches notebooks" bash -c '\
	  before=$$(find $(PKG) -name "*.py" -print0 | sort -z | xargs -0 sha256sum); \
	  nbdev_export || exit 1; \
	  after=$$(find $(PKG) -name "*.py" -print0 | sort -z | xargs -0 sha256sum); \
	  if [ "$$before" != "$$after" ]; then diff <(echo "$$before") <(echo "$$after"); \
	    echo "nbdev_export changed $(PKG)/: export the notebooks and commit the package with them"; exit 1; fi; \
	  $(PYTHON) .ci/readme.py --check'

lint:
	@$(STAGE) "ruff" ruff check $(PKG) tests bench nbs .ci setup.py

nbtest:
	@$(STAGE) "nbdev_test (every notebook)" nbdev_test --timing

## nbdev's processing of every notebook, as `make book` runs it before Quarto, on a temporary copy
docs-check:
	@$(STAGE) "book build before Quarto (nbdev processing)" $(PYTHON) .ci/proc_docs.py

pytest:
	@$(STAGE) "pytest" $(PYTHON) -m pytest tests -q -p no:cacheprovider

clean:
	rm -rf _proc _site nbs/sidebar.yml nbs/nbdev.yml

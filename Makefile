# The two commands of the README, and a few helpers. Each sets up the environment first
# (scripts/env.sh: ./.venv, or an active conda env named "labkit").
.PHONY: lab test browser notebooks bench setup

lab:        ## set up, then open the practicum in JupyterLab
	bash scripts/env.sh run jupyter lab notebooks/

test:       ## set up, then run every test: unit tests, peers, nbval on solutions/, notebook drift
	bash scripts/env.sh run pytest

browser:    ## only the browser test: JupyterLab + headless chromium; screenshots in test-artifacts/browser/
	bash scripts/env.sh run pytest -o addopts= -p no:nbval -m browser tests/test_browser.py

notebooks:  ## regenerate the student notebooks from solutions/
	bash scripts/env.sh run labkit.notebooks build

bench:      ## benchmarks against the peer libraries (not part of the tests); ARGS=--quick for small sizes
	bash scripts/env.sh setup
	for f in tests/benchmarks/bench_*.py; do .venv/bin/python $$f $(ARGS) || exit 1; done

setup:
	bash scripts/env.sh setup

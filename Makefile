# The two commands of the README, and a few helpers. Each sets up the environment first
# (scripts/env.sh: ./.venv, or an active conda env named "labkit").
.PHONY: lab test browser notebooks bench setup wheel

lab:        ## set up, then open the practicum in JupyterLab; ARGS="--no-browser --port 8890" passes options on
	bash scripts/env.sh lab $(ARGS)

test:       ## set up, then run every test: unit tests, peers, nbval on solutions/, notebook drift
	bash scripts/env.sh run pytest

browser:    ## only the browser test: JupyterLab + headless chromium; screenshots in test-artifacts/browser/
	bash scripts/env.sh run pytest -o addopts= -p no:nbval -m browser tests/test_browser.py

notebooks:  ## regenerate the student notebooks from solutions/
	bash scripts/env.sh run labkit.notebooks build

bench:      ## one table of labkit against the peer libraries, + scaling (not tests); ARGS="--quick --device cuda"
	bash scripts/env.sh setup
	OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/run.py --threads 1 --csv benchmarks.csv $(ARGS)
	OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/scaling.py --threads 1 --csv scaling.csv $(ARGS)

test-gpu:   ## on a CUDA machine: every test (the gpu-marked ones compare CUDA with CPU), then the benchmarks there
	bash scripts/env.sh setup
	.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'test-gpu needs CUDA')"
	LABKIT_TEST_DEVICE=cuda bash scripts/env.sh run pytest
	.venv/bin/python tests/benchmarks/run.py --device cuda --csv benchmarks-cuda.csv
	.venv/bin/python tests/benchmarks/scaling.py --device cuda --csv scaling-cuda.csv

wheel:      ## dist/labkit-<version>-py3-none-any.whl (weights included): upload it next to a notebook on Colab
	bash scripts/env.sh run pip wheel --no-deps --no-build-isolation --wheel-dir dist .

setup:
	bash scripts/env.sh setup

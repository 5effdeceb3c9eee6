"""Settings for validating the lesson notebooks with nbval: ``pytest --nbval solutions/``.

- The kernel is the Python that runs pytest (nbval's ``--nbval-current-env``), so the notebooks
  run against the labkit installed there, whatever kernels Jupyter knows about.
- ``OMP_NUM_THREADS`` defaults to 1 for the kernels: the lessons' tensors are small, one thread
  is never much slower, and on a busy machine several threads can be many times slower; it
  also makes float rounding the same from run to run. Set it to override.

Stored outputs are compared (text and stderr; images are skipped by nbval). Cells whose output
genuinely differs between machines carry a ``# NBVAL_IGNORE_OUTPUT`` line.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    if getattr(config.option, "nbval", False) and not config.option.nbval_kernel_name:
        config.option.nbval_current_env = True

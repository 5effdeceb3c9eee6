"""labkit's CPU thread default: ``$LABKIT_THREADS`` wins everywhere; in a notebook kernel without
``OMP_NUM_THREADS`` labkit sets :func:`labkit.default_threads`; elsewhere torch's own choice stays."""
import os
import subprocess
import sys

import pytest

import labkit

PROBE = "import sys; {pre}import labkit, torch; print(torch.get_num_threads())"


def threads_after_import(env: dict, kernel: bool = False) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LABKIT_THREADS")}
    pre = "sys.modules['ipykernel'] = type(sys)('ipykernel'); " if kernel else ""  # as inside a kernel
    return subprocess.run([sys.executable, "-c", PROBE.format(pre=pre)], env={**clean, **env},
                          capture_output=True, text=True)


@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, 4)])
def test_default_is_half_the_cores_between_1_and_4(cpus, expected):
    assert labkit.default_threads(cpus) == expected


def test_labkit_threads_sets_the_count_everywhere():
    assert threads_after_import({"LABKIT_THREADS": "3"}).stdout.strip() == "3"
    assert threads_after_import({"LABKIT_THREADS": "1", "OMP_NUM_THREADS": "2"}, kernel=True).stdout.strip() == "1"


def test_a_kernel_gets_the_default_unless_omp_num_threads_is_set():
    assert threads_after_import({}, kernel=True).stdout.strip() == str(labkit.default_threads())
    assert threads_after_import({"OMP_NUM_THREADS": "2"}, kernel=True).stdout.strip() == "2"


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_labkit_threads_says_what_it_expects(value):
    result = threads_after_import({"LABKIT_THREADS": value})
    assert result.returncode != 0 and "LABKIT_THREADS must be a whole number of threads >= 1" in result.stderr

"""The generated student notebooks (notebooks/) as a student first runs them, before writing any
code: everything up to the first exercise runs without error, and every exercise's check says
"not implemented yet" (the equivalent of nbgrader's ``validate --invert``). Also: they are up to
date with solutions/."""
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from labkit import notebooks as tool

ROOT = Path(__file__).resolve().parents[1]
STUDENT_NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHECK_CALL = re.compile(r"\bcheck_\w+\(")
RESULT_LINE = re.compile(r"^(✅|❌) (check_\w+): (.*)$", re.MULTILINE)


def test_student_notebooks_are_up_to_date():
    assert tool.drift(ROOT / "solutions", ROOT / "notebooks") == []


def outputs_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.output_type == "stream")


def errors(cell) -> list[str]:
    return [out.ename for out in cell.get("outputs", []) if out.output_type == "error"]


@pytest.fixture(scope="module", params=STUDENT_NOTEBOOKS, ids=[p.name for p in STUDENT_NOTEBOOKS])
def executed(request):
    nb = nbformat.read(request.param, as_version=4)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # small tensors; several threads crawl on a busy machine
        env.delenv("LABKIT_CHECK_LOG", raising=False)
        # a stuck cell is interrupted (and then fails the test as a KeyboardInterrupt)
        NotebookClient(nb, timeout=180, interrupt_on_timeout=True, kernel_name="python3",
                       allow_errors=True, record_timing=False,
                       resources={"metadata": {"path": str(request.param.parent)}}).execute()
    return nb


@pytest.mark.slow
def test_runs_without_error_up_to_the_first_exercise(executed):
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    first = next((i for i, cell in enumerate(code) if "raise NotImplementedError(" in cell.source),
                 len(code) - 1)  # a notebook without exercises (the playground) runs to the end
    for cell in code[:first]:
        assert not errors(cell), f"cell failed before any exercise:\n{cell.source}"
    # a concept question's stub raises when run (an exercise's stub only when its function is called)
    assert set(errors(code[first])) <= {"NotImplementedError"}, code[first].source


@pytest.mark.slow
def test_every_stub_fails_its_check_and_nothing_else_fails(executed):
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    check_cells = [cell for cell in code if CHECK_CALL.search(cell.source)]
    stubs = [cell for cell in code if "raise NotImplementedError(" in cell.source]
    assert bool(check_cells) == bool(stubs), "exercises without checks, or checks without exercises"
    for cell in check_cells:
        results = RESULT_LINE.findall(outputs_text(cell))
        assert results, f"the check printed nothing:\n{cell.source}"
        for mark, _, hint in results:
            assert mark == "❌" and hint.startswith("not implemented yet"), hint
    for cell in code:
        unexpected = [name for name in errors(cell) if name != "NotImplementedError"]
        assert not unexpected, f"{unexpected} in a student notebook cell:\n{cell.source}"
        assert "✅" not in outputs_text(cell), "a stub passed its check"

"""labkit.notebooks: solution notebooks -> student notebooks, on small synthetic notebooks."""
import subprocess
import sys

import nbformat
import pytest

from labkit import notebooks as tool


def solution_notebook():
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Lesson 99: a test"),
        nbformat.v4.new_code_cell("import math\nprint('hello')"),
        nbformat.v4.new_code_cell(
            "def area(r):\n"
            "    \"\"\"Area of a circle.\"\"\"\n"
            "    ### BEGIN SOLUTION\n"
            "    ### HINT: pi times r squared\n"
            "    return math.pi * r ** 2\n"
            "    ### END SOLUTION\n"
            "\n"
            "def double(v):\n"
            "    if v is not None:\n"
            "        ### BEGIN SOLUTION\n"
            "        return 2 * v\n"
            "        ### END SOLUTION\n"),
        nbformat.v4.new_markdown_cell("The answer is 42.", metadata={"tags": ["solution-only"]}),
        nbformat.v4.new_code_cell("secret = 1", metadata={"tags": ["solution-only", "other"]}),
        nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 3\n### END SOLUTION\nprint(x)"),
    ]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"
        if cell.cell_type == "code":
            cell.execution_count = i
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="out\n")]
            cell.metadata["execution"] = {"iopub.execute_input": "2024-01-01T00:00:00Z"}
    return nb


def code_sources(nb):
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_solution_block_becomes_a_placeholder_at_the_marker_indentation():
    student = tool.student_notebook(solution_notebook())
    area_and_double = code_sources(student)[2]
    assert area_and_double == (
        "def area(r):\n"
        "    \"\"\"Area of a circle.\"\"\"\n"
        "    raise NotImplementedError(\"pi times r squared\")\n"
        "\n"
        "def double(v):\n"
        "    if v is not None:\n"
        f"        raise NotImplementedError(\"{tool.DEFAULT_MESSAGE}\")\n")
    assert "math.pi" not in area_and_double and "2 * v" not in area_and_double
    assert code_sources(student)[3] == f"raise NotImplementedError(\"{tool.DEFAULT_MESSAGE}\")\nprint(x)"


def test_the_placeholder_is_valid_python_that_raises_with_the_hint():
    student = tool.student_notebook(solution_notebook())
    namespace = {}
    exec(code_sources(student)[1].replace("print('hello')", ""), namespace)
    exec(code_sources(student)[2], namespace)
    with pytest.raises(NotImplementedError, match="pi times r squared"):
        namespace["area"](1.0)


def test_several_hints_are_joined_and_quotes_escaped():
    source = '### BEGIN SOLUTION\n### HINT: use "sign"\n### HINT: then clamp\ny = 1\n### END SOLUTION'
    stripped = tool.strip_solutions(source)
    with pytest.raises(NotImplementedError) as info:
        exec(stripped, {})
    assert str(info.value) == 'use "sign" then clamp'


def test_solution_only_cells_removed_and_setup_cell_after_title():
    student = tool.student_notebook(solution_notebook())
    assert not any("42" in c.source or "secret" in c.source for c in student.cells)
    assert student.cells[0].source == "# Lesson 99: a test"
    assert student.cells[1].source == tool.SETUP_SOURCE and student.cells[1].id == tool.SETUP_CELL_ID
    assert len(student.cells) == len(solution_notebook().cells) - 2 + 1


def test_outputs_counts_timings_and_widget_state_cleared():
    solution = solution_notebook()
    student = tool.student_notebook(solution)
    for cell in student.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            assert "execution" not in cell.metadata
    assert "widgets" not in student.metadata and student.metadata["kernelspec"]["name"] == "python3"
    assert solution.cells[1].outputs, "the solution notebook itself must not be modified"
    nbformat.validate(student)


def test_setup_cell_installs_only_when_labkit_is_missing(tmp_path, monkeypatch):
    from IPython.core.inputtransformer2 import TransformerManager
    python = TransformerManager().transform_cell(tool.SETUP_SOURCE)
    calls = []
    namespace = {}
    # IPython expands {name} in a magic's line from the cell's namespace; so does this stand-in
    shell = type("Shell", (), {"run_line_magic": lambda self, magic, line: calls.append((magic, line.format(**namespace)))})
    namespace["get_ipython"] = lambda: shell()
    monkeypatch.chdir(tmp_path)
    exec(python, namespace)
    assert calls == []  # labkit is importable here
    missing = python.replace('find_spec("labkit")', 'find_spec("surely_not_a_module_xyz")')
    exec(missing, namespace)
    assert calls[-1][0] == "pip" and tool.INSTALL_SPEC in calls[-1][1]
    # Colab without a public address: a wheel uploaded next to the notebook wins (the newest name)
    for name in ("labkit-0.1.0-py3-none-any.whl", "labkit-0.2.0-py3-none-any.whl", "other-1.0.whl"):
        (tmp_path / name).write_bytes(b"")
    exec(missing, namespace)
    assert calls[-1] == ("pip", 'install --quiet "labkit-0.2.0-py3-none-any.whl"')


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without a"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside the solution block"),
])
def test_malformed_markers_raise_with_the_line(source, message):
    with pytest.raises(ValueError, match=message):
        tool.strip_solutions(source, "nb.ipynb, cell 3")


def test_markers_in_markdown_are_refused():
    nb = solution_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("### BEGIN SOLUTION\nanswer\n### END SOLUTION"))
    with pytest.raises(ValueError, match="solution-only"):
        tool.student_notebook(nb)


def write_solutions(root, names=("01_a.ipynb", "02_b.ipynb")):
    solutions = root / "solutions"
    solutions.mkdir()
    for name in names:
        nbformat.write(solution_notebook(), solutions / name)
    return solutions, root / "notebooks"


def test_build_is_idempotent_and_byte_stable(tmp_path):
    solutions, notebooks = write_solutions(tmp_path)
    assert sorted(p.name for p in tool.build(solutions, notebooks)) == ["01_a.ipynb", "02_b.ipynb"]
    first = (notebooks / "01_a.ipynb").read_bytes()
    assert tool.build(solutions, notebooks) == []
    assert (notebooks / "01_a.ipynb").read_bytes() == first
    assert tool.drift(solutions, notebooks) == []
    # the rendering is stable JSON: a round trip through nbformat gives the same bytes
    assert tool.render(nbformat.read(notebooks / "01_a.ipynb", as_version=4)).encode() == first


def test_check_detects_drift_missing_and_extra_files(tmp_path):
    solutions, notebooks = write_solutions(tmp_path, ("01_a.ipynb", "02_b.ipynb", "03_c.ipynb"))
    tool.build(solutions, notebooks)
    edited = notebooks / "01_a.ipynb"
    edited.write_text(edited.read_text().replace("pi times r squared", "pi r^2"))
    (notebooks / "02_b.ipynb").unlink()
    (notebooks / "99_orphan.ipynb").write_text((notebooks / "03_c.ipynb").read_text())
    problems = tool.drift(solutions, notebooks)
    assert len(problems) == 3
    assert "01_a.ipynb: differs" in problems[0]
    assert "02_b.ipynb: missing" in problems[1]
    assert "99_orphan.ipynb: has no source" in problems[2]


def test_a_changed_solution_is_drift(tmp_path):
    solutions, notebooks = write_solutions(tmp_path)
    tool.build(solutions, notebooks)
    nb = nbformat.read(solutions / "02_b.ipynb", as_version=4)
    nb.cells[1].source = "print('changed')"
    nbformat.write(nb, solutions / "02_b.ipynb")
    assert [p.split(":")[0] for p in tool.drift(solutions, notebooks)] == [str(notebooks / "02_b.ipynb")]


def test_command_line_build_then_check(tmp_path):
    write_solutions(tmp_path)
    run = lambda *args: subprocess.run([sys.executable, "-m", "labkit.notebooks", *args],
                                       cwd=tmp_path, capture_output=True, text=True)
    assert run("check").returncode == 1
    built = run("build")
    assert built.returncode == 0 and "notebooks/01_a.ipynb" in built.stdout
    assert run("check").returncode == 0
    (tmp_path / "notebooks" / "01_a.ipynb").write_text("{}")
    failed = run("check")
    assert failed.returncode == 1 and "01_a.ipynb: differs" in failed.stderr


def test_execute_stores_outputs_without_timings_or_widget_state(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.cells = [nbformat.v4.new_code_cell("import os\nprint(6 * 7, os.path.basename(os.getcwd()))")]
    path = tmp_path / "lesson" / "99_x.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    assert tool.execute(path) > 0
    executed = nbformat.read(path, as_version=4)
    assert executed.cells[0].outputs[0].text == "42 lesson\n"  # ran in the notebook's own folder
    assert "execution" not in executed.cells[0].metadata and "widgets" not in executed.metadata
    assert path.read_text() == tool.render(executed)

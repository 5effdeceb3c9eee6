"""Words that match the numbers: every number a lesson's prose (its markdown cells) states must
be one its own code printed, or one its code sets, so that re-running a lesson with different
results makes this test fail until the text is updated.

How a prose number is matched (see :func:`prose_numbers` and :func:`matches`):

- read from the markdown with inline code, code blocks and links left out (``steps=256`` is
  code, not a claim); numbers glued to letters (``conv5``, ``L2``, ``α2β1``, ``1e-6`` in code)
  are names, not quantities;
- a number with d decimals matches a printed or coded number that rounds to it at d decimals;
  a percentage also matches the fraction (94 % matches 0.94 and 0.938); ``1,000`` is 1000;
- not checked: whole numbers up to 10 (counts and ordinals: "two rows", "question 3"), years
  (1900-2039) and numbers right after "lesson", "section", "question", "step" or "Table";
- :data:`ALLOWED` lists, per lesson, the numbers that are facts rather than this run's
  measurements (the size of Fashion-MNIST, the paper's recommended σ, ...), each with its reason.

The failure message lists each unmatched number with the sentence around it.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

SOLUTIONS = Path(__file__).resolve().parents[1] / "solutions"

# Numbers that are facts, definitions or settings of other code, not measurements of this run.
ALLOWED: dict[str, dict[float, str]] = {
    "*": {100: "per cent", 255: "grey levels of an 8-bit image", 224: "EfficientNet-Lite0's input size",
          1000: "ImageNet's classes", 28: "Fashion-MNIST's image size",
          784: "pixels of a 28 × 28 image"},
    "00": {70000: "Fashion-MNIST's size", 60000: "Fashion-MNIST's training set",
           195000: "rounded from the printed 195,466"},
    "02": {20: "the paper's recommended σ range, 10–20 %", 16: "range(100, 116): images chosen in code"},
    "04": {0.1: "the shipped robust model's training ε (its card)",
           2.8: "0.1 · √784, worked out in the text"},
    "06": {32: "conv1's kernels (the architecture)", 128: "the representation's size (the architecture)"},
    "07": {1280: "EfficientNet-Lite0's head channels", 32: "224 / 7",
           81: "9 × 9 window positions: ceil((224 − 48) / 24) + 1"},
    "08": {0.286: "the Fashion-MNIST mean used by the model's Normalize", 0.353: "its std",
           0.81: "0.286 / 0.353, the normalized black pixel", 49: "BatchNorm count, printed by the cell"},
    "09": {114: "parameters (in thousands) of small_cnn, from its definition", 12: "the shipped model's epochs (model card)",
           1.25: "train.PGDAdversary's default step, 2.5 ε / steps"},
    "10": {0.1: "an ε to try in the explorer", 0.005: "an ε to try in the explorer"},
    "13": {1000: "Ilyas et al.'s normalized-gradient steps (the paper)"},
}
CONTEXT_WORDS = r"(?:lessons?|sections?|questions?|steps?|Table|sec\.|notebook|cell)"
NUMBER = re.compile(r"(?<![\w.^_\\{])[-−]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w])|(?<![\w.^_\\{])[-−]?\d+(?:\.\d+)?(?![\w.]?\w)")


def strip_markup(markdown: str) -> str:
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    return text


def prose_numbers(markdown: str) -> list[tuple[float, int, str]]:
    """``(value, decimals, context)`` for every checked number in a markdown cell."""
    text = strip_markup(markdown)
    found = []
    for match in NUMBER.finditer(text):
        literal = match.group().replace("−", "-").replace(",", "")
        value = float(literal)
        decimals = len(literal.split(".")[1]) if "." in literal else 0
        before = text[max(0, match.start() - 30):match.start()]
        if re.search(CONTEXT_WORDS + r"\s*$", before, flags=re.I):
            continue
        if decimals == 0 and (abs(value) <= 10 or 1900 <= value < 2040):
            continue
        context = " ".join(text[max(0, match.start() - 60):match.end() + 40].split())
        found.append((value, decimals, context))
    return found


def known_numbers(nb) -> set[float]:
    """Every number the notebook's outputs print and its code cells contain, as fractions and as
    percentages."""
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        texts.append(cell.source)
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                texts.append(output.get("text", ""))
            elif "data" in output:
                texts.append(output["data"].get("text/plain", ""))
    values = set()
    for text in texts:
        for literal in re.findall(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e-?\d+)?", text):
            value = float(literal.replace(",", ""))
            values |= {value, -value, value * 100, -value * 100}
    return values


def matches(value: float, decimals: int, known: set[float]) -> bool:
    half = 0.5 * 10.0 ** -decimals + 1e-9
    return any(abs(k - value) <= half for k in known)


def lesson_files():
    return sorted(SOLUTIONS.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", lesson_files(), ids=lambda p: p.stem)
def test_prose_numbers_are_printed_by_the_lesson(path):
    nb = nbformat.read(path, as_version=4)
    known = known_numbers(nb)
    lesson = path.name[:2]
    allowed = {**ALLOWED["*"], **ALLOWED.get(lesson, {})}
    unmatched = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        for value, decimals, context in prose_numbers(cell.source):
            if any(abs(abs(value) - a) < 1e-9 for a in allowed) or matches(value, decimals, known):
                continue
            unmatched.append(f"cell {index}: {value:g} in “…{context}…”")
    assert not unmatched, (f"{path.name}: the prose states numbers that no output prints and no code "
                           f"sets (update the text, or print the number):\n  " + "\n  ".join(unmatched))


# ---------------------------------------------------------------- the rules themselves

def test_a_drifted_number_is_caught():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("print(f'{acc:.0%}')", outputs=[
            nbformat.v4.new_output("stream", text="accuracy 77%\nAUC 0.54\n")]),
        nbformat.v4.new_markdown_cell("Accuracy drops to 77 % (AUC 0.54), not 94 % and not 0.45.")])
    known = known_numbers(nb)
    results = {value: matches(value, decimals, known) for value, decimals, _ in prose_numbers(nb.cells[1].source)}
    assert results == {77: True, 0.54: True, 94: False, 0.45: False}


def test_rounding_fractions_and_what_is_not_checked():
    known = known_numbers(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "", outputs=[nbformat.v4.new_output("stream", text="0.938 1,000 2.8284\n")])]))
    assert matches(94, 0, known) and matches(2.8, 1, known) and matches(1000, 0, known)
    assert not matches(93, 0, known) and not matches(2.9, 1, known)
    skipped = "lesson 03 in 2019 with conv5, L2 and α2β1, `steps=256`, three 3 × 3 kernels, [a](x/12.ipynb)"
    assert prose_numbers(skipped) == []

"""Concept questions: "predict before you run". Each lesson asks a few short questions whose
answer is a letter (a choice) or a number; ``check_qNN_<topic>(answer)`` checks one, prints a
pass or a hint about the idea behind the wrong answer (never the right one), and records the
result like every other check, so the grader counts it the same way.

A question is a :class:`Question`; :data:`QUESTIONS` holds every lesson's, and a
``check_<name>`` function is made for each. To add one: append a :class:`Question` (its
``name`` starts with ``q`` and the lesson's number) and call its check in that lesson.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from ._engine import Result, is_raising, record


@dataclass(frozen=True)
class Question:
    """One question: ``answer`` is a letter of ``choices`` (a choice question) or a number
    (``choices`` empty), accepted within ``tolerance``. ``hints`` maps a wrong answer to what
    it misunderstands; ``hint`` is said for any other wrong answer."""
    name: str
    answer: str | float
    hint: str
    choices: str = ""
    hints: dict = field(default_factory=dict)
    tolerance: float = 0.0

    def judge(self, answer) -> tuple[bool, str]:
        """``(passed, hint)`` for a student's answer (``None``: not answered yet)."""
        if answer is None:
            kind = "a letter" if self.choices else "a number"
            return False, (f"not implemented yet: replace the `raise NotImplementedError(...)` line "
                           f"with `{self.name} = ...`, your prediction ({kind}), run that cell, then this one")
        if self.choices:
            letters = ", ".join(self.choices)
            if not isinstance(answer, str):
                return False, (f"answer with one letter as a string, one of {letters} (e.g. \"a\"), "
                               f"got {type(answer).__name__}")
            letter = answer.strip().strip("().").strip().lower()
            if len(letter) != 1 or letter not in self.choices:
                return False, f"answer with one of the letters {letters}, got {answer!r}"
            if letter == self.answer:
                return True, ""
            return False, self.hints.get(letter, self.hint)
        value = _number(answer)
        if value is None:
            return False, f"answer with a number (an int or a float), got {type(answer).__name__} {answer!r:.40}"
        if abs(value - self.answer) <= self.tolerance + 1e-9 * abs(self.answer):
            return True, ""
        known = next((h for wrong, h in self.hints.items() if math.isclose(value, wrong, abs_tol=1e-9)), None)
        return False, known or self.hint

    def check(self, answer) -> Result:
        """Print, record and return the verdict on ``answer`` (truthy when it is right); under
        :func:`raising` a wrong answer raises ``AssertionError(hint)``, as every check does."""
        passed, hint = self.judge(answer)
        result = record(f"check_{self.name}", passed, hint)
        if is_raising() and not result:
            raise AssertionError(result.hint)
        return result


def _number(answer) -> float | None:
    if isinstance(answer, bool):
        return None
    if hasattr(answer, "item") and getattr(answer, "ndim", 0) == 0:  # a 0-d tensor or NumPy scalar
        answer = answer.item()
    if isinstance(answer, str):
        try:
            answer = float(answer.strip().rstrip("%").strip())
        except ValueError:
            return None
    if not isinstance(answer, numbers.Real) or isinstance(answer, bool) or not math.isfinite(answer):
        return None
    return float(answer)


QUESTIONS = (
    # lesson 00
    Question("q00_pixels", 784, choices="",
             hint="count the values of one image: channels x height x width (the batch printed its shape)"),
    Question("q00_row_sum", 1, tolerance=1e-6,
             hint="each row holds one image's probabilities over the ten classes: what must probabilities "
                  "over all classes add up to?"),
    # lesson 01
    Question("q01_linear_gradient", "a", choices="abc",
             hints={"c": "that is the value f(x) itself, not how fast it changes with x"},
             hint="differentiate w . x + b with respect to x: which term depends on x, and how?"),
    Question("q01_black_pixel", "b", choices="abc",
             hint="gradient x input multiplies each pixel's gradient by the pixel's value: what is "
                  "anything times 0?"),
    Question("q01_sanity", "b", choices="ab",
             hint="which of the two maps contains the image itself as a factor, whatever the weights are?"),
    # lesson 02
    Question("q02_smoothgrad_limit", "a", choices="abc",
             hint="with sigma = 0 every noisy copy is x itself: what is the average of N equal gradients?"),
    Question("q02_completeness", "b", choices="abcd",
             hint="integrate the gradient along the path from the baseline to x (the fundamental "
                  "theorem of calculus): the result is a difference of two scores"),
    Question("q02_black_pixel_ig", 0,
             hint="IG multiplies by (x - baseline): what is that factor for a pixel that is black in "
                  "both the image and the baseline?"),
    # lesson 03
    Question("q03_fgsm_change", 0.1, tolerance=1e-6,
             hint="FGSM adds eps times the sign of the gradient: how large is eps * sign(g) for one pixel?"),
    Question("q03_random_signs", "b", choices="abc",
             hint="random signs point in a random direction; the gradient's signs point where the loss "
                  "grows fastest. Which direction should hurt more?"),
    Question("q03_linf_to_l2", 2.8, tolerance=0.05,
             hint="the L2 length of a vector whose 784 entries are all 0.1 is 0.1 times the square root "
                  "of the number of entries"),
    # lesson 04
    Question("q04_which_needs_more", "b", choices="ab",
             hint="which model was trained to resist perturbations, so that small changes no longer "
                  "move it?"),
    Question("q04_projection", 0.5, tolerance=1e-6,
             hint="the projection multiplies delta by min(1, eps / ||delta||_2)"),
    # lesson 05
    Question("q05_affine_correlation", 1, tolerance=1e-6,
             hint="Pearson's correlation subtracts the mean and divides by the norm: what is left of "
                  "a positive scale factor and a constant offset?"),
    Question("q05_best_aligned", "c", choices="abc",
             hints={"b": "SmoothGrad's blobs look calmer, but calmer is not the same as following the "
                         "outline: which map was cleaned by the *model*, not by averaging?"},
             hint="lesson 04: whose gradient points along perceptible changes of the garment?"),
    # lesson 06
    Question("q06_decay_step", 0.495, tolerance=1e-4,
             hint="with a zero gradient the step leaves the pixel as it is; then the decay multiplies "
                  "it by (1 - l2_decay)"),
    Question("q06_transfer", "b", choices="ab",
             hint="a pattern that exploits one network's quirks is an adversarial example grown from "
                  "noise; a picture that really shows the garment works for any decent classifier. "
                  "Which model's images showed garments?"),
    # lesson 07
    Question("q07_cell_size", 32,
             hint="divide the image's width by the number of cells across (the layer's width)"),
    Question("q07_guided_classes", "a", choices="ab",
             hint="guided backpropagation only lets positive gradients through the ReLUs of the forward "
                  "pass: how much of the class is left in the picture once the image's edges pass?"),
    Question("q07_sanity", "a", choices="ab",
             hint="which method depends on the class weights at the top (the gradient at the last "
                  "layer), and which mostly on the ReLU masks of the forward pass?"),
    # lesson 08
    Question("q08_conservation", 1, tolerance=1e-6,
             hint="without biases and without the stabilizer, each neuron hands down exactly the "
                  "relevance it got"),
    Question("q08_zplus_share", 100, tolerance=1e-6,
             hint="z+ keeps only the positive contributions (a_j w_jk)+: can a share ever be negative? "
                  "Answer in percent"),
    Question("q08_larger_eps", "b", choices="abc",
             hint="the stabilizer eps * sign(z) always makes the denominator larger in magnitude"),
    # lesson 09
    Question("q09_alpha_one", "a", choices="abc",
             hint="put alpha = 1 into alpha * CE(f(x), y) + (1 - alpha) * CE(f(x'), y)"),
    Question("q09_fgsm_vs_pgd", "a", choices="ab",
             hint="a model trained on one attack can learn to defeat that attack in particular; an "
                  "iterative attack searches the eps-ball more thoroughly"),
    # lesson 10
    Question("q10_grey_levels", 1.275, tolerance=0.3,
             hint="pixel values in the unit interval stand for the grey levels 0..255: multiply"),
    Question("q10_relu5_cell", 4,
             hint="a 28 x 28 image and a 7 x 7 layer: how many pixels does one cell span along a side?"),
    # lesson 11
    Question("q11_attack_bound", "b", choices="abc",
             hints={"a": "a lower bound needs a proof that no perturbation works; an attack only shows "
                         "that some do",
                    "c": "a stronger attack can still lower it: the attack may have missed perturbations"},
             hint="an attack that fails on an image proves nothing about the perturbations it did not try"),
    Question("q11_negative_weight", -2, tolerance=1e-6,
             hints={0: "that is the output at x = 0; with a negative weight the largest x gives the "
                       "smallest output"},
             hint="y = -2x is decreasing: its smallest value over the box comes from the box's upper end"),
    # lesson 12
    Question("q12_gini_one_hot", "b", choices="abc",
             hint="the Gini index measures how unequally the relevance is spread: all of it on one "
                  "pixel is as unequal as it gets"),
    Question("q12_same_ranking", "b", choices="ab",
             hint="black and grey deletion ask different questions of the model (what an image "
                  "without the pixel looks like): nothing forces the same order"),
    # lesson 13
    Question("q13_chance", 10, tolerance=0.5,
             hints={100: "the labels of the non-robust data set are random targets: what does a model "
                         "score on real images when what it learned tells it nothing about them?"},
             hint="ten classes: a model whose learned features say nothing about the real class is right "
                  "about one time in how many? Answer in percent"),
    Question("q13_robust_label", "b", choices="abc",
             hints={"a": "the start image only supplies the pixels to begin with; the descent erases what "
                         "the robust model sees of it",
                    "c": "the robust model's prediction on the start image is about the start image, "
                         "which the descent moves away from"},
             hint="the new image is made to look, to the robust model, like the image whose representation "
                  "it copies"),
    Question("q13_tag_corner", "d", choices="abcd",
             hint="look again at the mean |map| your suspicious_region scored: where do the maps of many "
                  "images agree, away from the garment? Row 0 is the image's top, column 0 its left"),
    # lesson 14
    Question("q14_receptive_field", 14, tolerance=0,
             hints={4: "that is how far the field moves per position (the stride), not how wide it is",
                    9: "each 3 x 3 convolution adds 2 x (the stride so far) pixels: after the pooling the stride is 2",
                    12: "each 3 x 3 convolution adds 2 x (the stride so far) pixels, and the 2 x 2 pooling adds 1 x (the stride so far)"},
             hint="grow the field layer by layer: R <- R + (k - 1) J, then J <- J s; start at R = 1, J = 1"),
    Question("q14_consis_uniform", 0.1, tolerance=1e-3,
             hints={1: "1 is a neuron whose top images all show one class; here they are spread evenly",
                    0: "p^T p is a sum of squares of the ten frequencies: it cannot be 0"},
             hint="p = (1/10, ..., 1/10) and A = I: p^T A p is the sum of the ten squares"),)


def _make_check(question: Question):
    def check(answer) -> Result:  # prints, records and returns, like every check_*
        return question.check(answer)
    check.__name__ = check.__qualname__ = f"check_{question.name}"
    check.__doc__ = f"Concept question {question.name}: pass your answer ({'a letter' if question.choices else 'a number'})."
    return check


_CHECKS = {f"check_{q.name}": _make_check(q) for q in QUESTIONS}
QUESTIONS_BY_CHECK = {f"check_{q.name}": q for q in QUESTIONS}  # for the grader, which judges answers itself
globals().update(_CHECKS)
__all__ = ["Question", "QUESTIONS", *_CHECKS]

"""The shared free-text multiple-choice parser (choice.py), used where a reference has no extraction
of its own or our prompt is not the reference's: it must read a reply as a person would. Expected
letters below are what a reader takes from each reply, not what the code happens to return."""

from __future__ import annotations

import math

import pytest

from personafuse.evaluation.benchmarks.choice import json_letter, parse_choice, weighted_stderr

OPTS = ["Photon", "Gluon", "W boson", "Graviton"]


def test_parse_choice_prefers_explicit_markers() -> None:
    opts = OPTS
    assert parse_choice("Answer: C", 4, opts) == 2
    assert parse_choice("[[b]]", 4, opts) == 1
    assert parse_choice("D. Graviton", 4, opts) == 3
    assert parse_choice("The force carrier is the photon.", 4, opts) == 0
    assert parse_choice("A good question; I am not sure.", 4, opts) is None
    assert parse_choice("Answer: E", 4, opts) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The audit's cases: a lowercase article is never option A.
        ("the best option is a considerate one, so B", "B"),
        ("Answer: C\n\nNote: option a is wrong", "C"),
        ('{"answer": "D"}', "D"),
        ('```json\n{"answer": "c"}\n```', "C"),
        ("A conversation would help, so the answer is D", "D"),
        ("I think the answer is a conversation: C", "C"),
        ("a", None),
        ("b", None),
        # Markers, restatements and the usual chat phrasings.
        ("[[B]]", "B"),
        ("The answer is (C).", "C"),
        ("Final answer: option D", "D"),
        ("My choice: A", "A"),
        ("Option B. Because it shows care.", "B"),
        ("I'd go with B because it is kind.", "B"),
        ("B is the most considerate response.", "B"),
        ("A is correct.", "A"),
        ("(C) Gluon... sorry, W boson", "C"),
        ("B", "B"),
        ("B)", "B"),
        ("D - Graviton", "D"),
        ("**Answer:** B", "B"),
        ("The answer is B. Option A would be rude.", "B"),
        # No letter a reader could name.
        ("I cannot decide between A and B.", None),
        ("A friend would ask how she feels.", None),
        ("Option B or option C, hard to say.", None),
        ("Answer: E", None),
        ("", None),
        ("A) Photon\nB) Gluon\nC) W boson\nD) Graviton", None),  # the options repeated back
        # The option's own text, whole words only ("Gluon" is not in "Gluons'").
        ("It has to be the graviton.", "D"),
        ("No force carrier here.", None),
    ],
)
def test_parse_choice_reads_free_text_as_a_person_would(text: str, expected: str | None) -> None:
    got = parse_choice(text, 4, OPTS)
    assert (None if got is None else "ABCD"[got]) == expected


def test_lowercase_letters_only_in_the_lenient_variant() -> None:
    assert parse_choice("answer: b", 4) is None
    assert parse_choice("answer: b", 4, lenient=True) == 1
    assert parse_choice("the answer is a kind word", 4, lenient=True) == 0  # why it is never `score`
    assert parse_choice("Answer: C", 4, lenient=True) == 2


def test_label_and_json_keys() -> None:
    assert parse_choice("Emotion: B\nCause: A", 4, label="emotion") == 1
    assert json_letter('{"answer_q1": "a", "answer_q2": "(C)"}', ("answer_q2",)) == "C"
    assert json_letter("{'answer': 'D. Graviton'}", ("answer",)) == "D"
    assert json_letter('{"reasoning": "A is rude"}', ("answer",)) is None


def test_weighted_stderr_is_lm_evals_mean_stderr_for_a_plain_mean() -> None:
    from lm_eval.api.metrics import mean_stderr

    xs = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert weighted_stderr(xs, [1 / len(xs)] * len(xs)) == pytest.approx(mean_stderr(xs))
    # A mean of two group means (2 items and 1 item): weights 1/4, 1/4, 1/2.
    ys = [1.0, 0.0, 1.0]
    sd = math.sqrt(1 / 3)  # sample std of 1, 0, 1
    assert weighted_stderr(ys, [0.25, 0.25, 0.5]) == pytest.approx(sd * math.sqrt(0.25**2 * 2 + 0.5**2))
    assert weighted_stderr([1.0], [1.0]) == 0.0

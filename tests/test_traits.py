import pytest

from personafuse import TRAIT_POLES
from personafuse.traits import (
    TraitError,
    big_five_summary,
    pole_name,
    poles_from_vector,
    tat_prior,
    validate_activation,
    vector_from_poles,
    weights_from_any,
)


def test_paper_order():
    assert TRAIT_POLES == (
        "high_O",
        "low_O",
        "high_C",
        "low_C",
        "high_E",
        "low_E",
        "high_A",
        "low_A",
        "high_N",
        "low_N",
    )


@pytest.mark.parametrize(
    "spelling, canonical",
    [
        ("High Agreeableness", "high_A"),
        ("low neuroticism", "low_N"),
        ("+O", "high_O"),
        ("C-", "low_C"),
        ("high-extroversion", "high_E"),
        ("low_E", "low_E"),
        ("HIGH OPENNESS", "high_O"),
    ],
)
def test_pole_spellings(spelling, canonical):
    assert pole_name(spelling) == canonical


def test_unknown_pole_is_named():
    with pytest.raises(TraitError, match="'very_A'"):
        pole_name("very_A")


def test_vector_round_trip():
    p = vector_from_poles(["high_A", "Low Neuroticism"])
    assert p == [0, 0, 0, 0, 0, 0, 1, 0, 0, 1]
    assert poles_from_vector(p) == ["high_A", "low_N"]


def test_validation_errors_name_the_problem():
    with pytest.raises(TraitError, match="9 entries"):
        validate_activation([1] * 9)
    with pytest.raises(TraitError, match="all zero"):
        validate_activation([0] * 10)
    with pytest.raises(TraitError, match=r"p\[3\] \(low_C\)"):
        validate_activation([1, 0, 0, 2, 0, 0, 0, 0, 0, 0])
    with pytest.raises(TraitError, match="both poles of Agreeableness"):
        validate_activation(vector_from_poles(["high_A", "low_A"]), allow_both_poles=False)


def test_weights_from_any():
    assert weights_from_any({"high_A": 3, "low_N": 1}, normalise=True)[6] == pytest.approx(0.75)
    with pytest.raises(TraitError, match="negative"):
        weights_from_any([0.5, -0.1] + [0.0] * 8)
    with pytest.raises(TraitError, match="11 entries"):
        weights_from_any([0.1] * 11)
    with pytest.raises(TraitError, match="'kind_A'"):
        weights_from_any({"kind_A": 1.0})
    with pytest.raises(TraitError, match="not a number"):
        weights_from_any(["x"] + [0.0] * 9)


def test_big_five_summary_and_tat_prior():
    w = vector_from_poles(["high_O", "low_C"])
    s = big_five_summary(w)
    assert s["Openness"] == pytest.approx(0.5) and s["Conscientiousness"] == pytest.approx(-0.5)
    assert poles_from_vector(tat_prior("therapist")) == ["high_C", "low_E", "high_A", "low_N"]
    with pytest.raises(TraitError, match="no TAT prior"):
        tat_prior("juggling")


def test_two_spellings_of_one_pole_are_refused_and_one_name_is_one_pole():
    with pytest.raises(TraitError, match="'high_A' and 'A\\+' both name high_A"):
        weights_from_any({"high_A": 3, "A+": 1})
    assert vector_from_poles("high_A") == vector_from_poles(["high_A"])
    assert sum(vector_from_poles("high_A")) == 1

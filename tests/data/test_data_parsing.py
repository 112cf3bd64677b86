"""Parsing table: realistic teacher outputs (good and bad) with the expected p or reject reason."""

from __future__ import annotations

import pytest

from personafuse.data.parsing import extract_json, parse_cues, parse_full, parse_response, parse_traits
from personafuse.data.validation import Rejection
from personafuse.traits import vector_from_poles

PAPER_TABLE2 = """(1) Analyze the Situation Cues
Social Cue: The user's message shows worry and uncertainty about their job, so they need empathy
and reassurance.
Task Cue: The assistant should explain how pay for cancelled shifts usually works, carefully and clearly.
(2) Identify Traits
Based on social cue:
• High Neuroticism: (sensitive/nervous)
• High Agreeableness: (friendly/compassionate).
The message highlights nervousness, which fits high neuroticism; warmth will comfort the user.
Based on task cue:
• High Agreeableness: (friendly/compassionate)
• High Conscientiousness: (efficient/organized)
These traits help the assistant support the user in a stressful moment.
##Response:
I can hear how worried you are. Let's go through it step by step: first, check your contract...
##Persona Behavior Rationale:
Warmth comes from agreeableness, the step-by-step plan from conscientiousness.
"""

PAPER_TABLE9_ANSWER = """Step 1: Analyze the Social Cue
- Social Cue: The user sounds excited and playful.
- Reasoning: They will enjoy an imaginative reply.
Step 2: Analyze the Task Cue
- Task Cue: A short creative story about a family.
- Reasoning: The answer must be creative.
Step 3: Identify Personality Traits
- Identified Traits:
High Openness, Low Conscientiousness
Step 5: Provide the Final Response
##Response: Once upon a time, in a little town between green hills, a family packed a picnic...
##Persona Behavior Rationale: The whimsical plot shows openness; the loose structure shows low conscientiousness.
"""

TRAIT_CASES = [
    # (name, teacher output, expected poles or reject reason)
    ("json", '{"social": [{"pole": "High Agreeableness", "reason": "warm"}], "task": [{"pole": "High Conscientiousness", "reason": "clear"}]}',
     ["high_A", "high_C"]),
    ("fenced json with chatter", 'Sure, here you go!\n```json\n{"social": [{"pole": "Low Neuroticism", "reason": "calm"}],\n "task": ["high_C"]}\n```\nHope that helps.',
     ["low_N", "high_C"]),
    ("trailing comma", '{"social": [{"pole": "High Openness", "reason": "x"},], "task": [],}', ["high_O"]),
    ("single quotes", "{'social': ['High Extraversion'], 'task': ['Low Agreeableness']}", ["high_E", "low_A"]),
    ("dict of reasons", '{"social_traits": {"High Agreeableness": "kind"}, "task_traits": {"+C": "careful"}}', ["high_A", "high_C"]),
    ("level + trait fields", '{"social": [{"trait": "Neuroticism", "level": "low", "reason": "steady"}], "task": []}', ["low_N"]),
    ("p vector", '{"p": [0,0,1,0,0,0,1,0,0,1]}', ["high_C", "high_A", "low_N"]),
    ("paper table 2", PAPER_TABLE2, ["high_N", "high_A", "high_C"]),
    ("paper table 9 answer", PAPER_TABLE9_ANSWER, ["high_O", "low_C"]),
    ("markdown bullets", "**Social traits**\n- **High Agreeableness** – be gentle\n\n**Task traits**\n- **High Conscientiousness** – be precise\n",
     ["high_C", "high_A"]),
    ("prose only", "The assistant should show high agreeableness and low neuroticism to calm the user down.", ["high_A", "low_N"]),
    ("extroversion spelling", "Based on social cue:\n- High Extroversion: upbeat\nBased on task cue:\n- Low Openness to Experience: practical",
     ["low_O", "high_E"]),
    # bad outputs
    ("no traits at all", "I'm happy to help with that! Let me know if you need anything else.", "unparseable"),
    ("empty", "", "unparseable"),
    ("empty json lists", '{"social": [], "task": []}', "all_zero_p"),
    ("unknown pole json", '{"social": [{"pole": "High Happiness", "reason": "fun"}], "task": []}', "unknown_pole"),
    ("medium level", '{"social": ["Medium Openness"], "task": []}', "unknown_pole"),
    ("unknown pole bullet", "Based on social cue:\n• High Happiness: (cheerful)\nBased on task cue:\n• High Agreeableness: kind", "unknown_pole"),
    ("both poles", '{"social": ["High Neuroticism"], "task": ["Low Neuroticism"]}', "both_poles"),
    ("trait names without level", "Based on social cue: agreeableness matters.\nBased on task cue: conscientiousness.", "all_zero_p"),
    ("truncated json", '{"social": [{"pole": "High Agree', "unparseable"),
    ("json of wrong type", '{"social": 5, "task": []}', "unparseable"),
]


@pytest.mark.parametrize("name,text,expected", TRAIT_CASES, ids=[c[0] for c in TRAIT_CASES])
def test_trait_table(name: str, text: str, expected: list[str] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(Rejection) as ei:
            parse_traits(text).p  # noqa: B018 - the property validates
        assert ei.value.reason == expected, ei.value
    else:
        choice = parse_traits(text)
        assert choice.p == vector_from_poles(expected)


def test_paper_table2_keeps_cue_attribution() -> None:
    choice = parse_traits(PAPER_TABLE2)
    assert [p for p, _ in choice.social] == ["high_N", "high_A"]
    assert [p for p, _ in choice.task] == ["high_A", "high_C"]


CUE_CASES = [
    ('{"social_cue": "anxious and unsure", "task_cue": "explain pay rules"}', ("anxious and unsure", "explain pay rules")),
    ("```json\n{'social': 'playful', 'task': 'write a story'}\n```", ("playful", "write a story")),
    ("Social Cue: worried about pay.\n\nTask Cue: explain the policy clearly.", ("worried about pay.", "explain the policy clearly.")),
    ("**Social cue:** calm and curious\n**Task cue:** a maths proof", ("calm and curious", "a maths proof")),
    (PAPER_TABLE2, None),
    (PAPER_TABLE9_ANSWER, ("The user sounds excited and playful.", "A short creative story about a family.")),
]


@pytest.mark.parametrize("text,expected", CUE_CASES)
def test_cue_table(text: str, expected: tuple[str, str] | None) -> None:
    cues = parse_cues(text)
    if expected is None:  # multi-line paper paragraph: check the start and the end
        assert cues.social.startswith("The user's message shows worry") and cues.social.endswith("reassurance.")
        assert cues.task.startswith("The assistant should explain")
    else:
        assert (cues.social, cues.task) == expected


@pytest.mark.parametrize("text", ["", "no cues here", '{"social_cue": "", "task_cue": "x"}', "Social Cue: only one"])
def test_cue_rejects(text: str) -> None:
    with pytest.raises(Rejection) as ei:
        parse_cues(text)
    assert ei.value.reason == "unparseable"


RESPONSE_CASES = [
    ("## Analysis\nplan\n## Response\nHello there.\n## Rationale\nWarm.", "Hello there.", "Warm."),
    ("##Response: Short answer.\n##Persona Behavior Rationale: Because.", "Short answer.", "Because."),
    ("**Response:**\nLine one.\n\nLine two.\n\n**Rationale:** calm tone", "Line one.\n\nLine two.", "calm tone"),
    ('{"response": "json answer", "rationale": "json why"}', "json answer", "json why"),
    ("Just a plain answer with no headings.", "Just a plain answer with no headings.", None),
    ("Here is the required format:\n##Response:...\n##Persona Behavior Rationale:...\n##Response:\nReal answer.\n##Persona Behavior Rationale:\nReal why.",
     "Real answer.", "Real why."),
    ("## Response\nResponse time matters: reply fast.\n## Rationale\nx", "Response time matters: reply fast.", "x"),
    (PAPER_TABLE2, "I can hear how worried you are. Let's go through it step by step: first, check your contract...",
     "Warmth comes from agreeableness, the step-by-step plan from conscientiousness."),
]


@pytest.mark.parametrize("text,response,rationale", RESPONSE_CASES)
def test_response_table(text: str, response: str, rationale: str | None) -> None:
    parts = parse_response(text)
    assert parts.response == response
    assert parts.rationale == rationale


@pytest.mark.parametrize("text,reason", [
    ("", "empty_response"),
    ("Social Cue: sad\nTask Cue: help\nBased on social cue:\n- High Agreeableness: x", "unparseable"),
])
def test_response_rejects(text: str, reason: str) -> None:
    with pytest.raises(Rejection) as ei:
        parse_response(text)
    assert ei.value.reason == reason


def test_parse_full_paper_layout() -> None:
    full = parse_full(PAPER_TABLE2)
    assert full.traits.p == vector_from_poles(["high_N", "high_A", "high_C"])
    assert full.parts.response.startswith("I can hear")
    assert full.parts.rationale and full.parts.rationale.startswith("Warmth")


def test_extract_json_never_raises_on_junk() -> None:
    for junk in ["{", "}{", "{{{{", '{"a": [1, 2', "{'a': __import__('os')}", "{" * 5000, "\x00{\x00}"]:
        assert extract_json(junk) is None or isinstance(extract_json(junk), dict)


def test_fuzzed_teacher_output_only_ever_rejects() -> None:
    """Random splices of realistic fragments: every parser returns a value or a Rejection, nothing else."""
    import random

    fragments = [
        "Social Cue:", "Task Cue:", "Based on social cue:", "##Response:", "## Rationale", "{", "}", '"social":',
        "[", "]", "• High Agreeableness: (kind)", "- Low Happiness", "```json", "```", "high neuroticism", ",",
        "##Persona Behavior Rationale:", "**Response**", "\n", "\n\n", "'task': ['+C']", "null", "Step 3:", "…",
        '{"p": [1,0,1]}', "Low Openness to Experience", "\\", '"', "：", "🙂",
    ]
    rng = random.Random(1234)
    for _ in range(400):
        text = " ".join(rng.choice(fragments) for _ in range(rng.randint(0, 25)))
        for fn in (parse_cues, parse_traits, parse_response, parse_full):
            try:
                out = fn(text)
                if fn is parse_traits:
                    out.p  # noqa: B018
            except Rejection:
                pass

"""Prompt wording for Persona-CoT and the baseline modes (our own text, versioned).

Change ``PROMPT_VERSION`` whenever any wording below changes: every record stores the version it
was generated with, and a resumed run refuses to mix versions in one output folder.

Two families of prompts:

* free-text prompts for capable teachers (OpenAI-compatible endpoints, vLLM, larger local models):
  each step asks for machine-readable output (JSON for steps 1-2, headed sections for step 3);
* constrained prompts for small local teachers: the teacher writes short cue sentences and the
  response, but the pole choice is made by comparing log-likelihoods of fixed option strings
  (``pole_option_text``), so nothing has to be parsed out of free text.
"""

from __future__ import annotations

from collections.abc import Sequence

from personafuse.traits import POLE_DESCRIPTIONS, TRAIT_NAMES, TRAIT_POLES

PROMPT_VERSION = "pcot-v1"

Messages = list[dict[str, str]]

HUMAN_LIKE_INSTRUCTION = (
    "Talk to the user the way a relaxed, friendly person would in a chat: casual everyday words, "
    "short sentences, a bit of warmth, no lecture and no bullet-point report unless they ask for one."
)


def pole_label(pole: str) -> str:
    """``high_A`` -> ``High Agreeableness`` (the spelling teachers see and write back)."""
    level, code = pole.split("_")
    return f"{level.capitalize()} {TRAIT_NAMES[code]}"


def _pole_menu() -> str:
    return "\n".join(f"- {pole_label(p)}: {POLE_DESCRIPTIONS[p]}" for p in TRAIT_POLES)


# ---------------------------------------------------------------------------- free-text prompts


def cue_messages(query: str) -> Messages:
    """Step 1: the social cue and the task cue of a query, as JSON."""
    system = (
        "You study conversations the way an organisational psychologist would. For a message sent "
        "to an assistant you describe two kinds of situational cue.\n"
        "The social cue: how the person sounds and feels, what they seem to want from the exchange "
        "and which social norms apply.\n"
        "The task cue: what the job itself is, how hard it is, which skills it needs and what a "
        "good outcome looks like.\n"
        'Reply with one JSON object and nothing else: {"social_cue": "...", "task_cue": "..."} '
        "with one or two sentences in each field."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Message:\n{query}"}]


def traits_messages(query: str, social_cue: str, task_cue: str) -> Messages:
    """Step 2: which Big Five poles each cue calls for in the assistant, with reasons, as JSON."""
    system = (
        "Trait Activation Theory says a situation brings out the personality traits that fit it. "
        "Given a message and its two cues, decide which traits the assistant should show when it "
        "answers. Choose from exactly these ten poles:\n"
        f"{_pole_menu()}\n"
        "Pick one to three poles per cue, never both poles of the same trait, and give a short "
        "reason for each. Reply with one JSON object and nothing else, shaped like\n"
        '{"social": [{"pole": "High Agreeableness", "reason": "..."}], '
        '"task": [{"pole": "High Conscientiousness", "reason": "..."}]}'
    )
    user = f"Message:\n{query}\n\nSocial cue: {social_cue}\nTask cue: {task_cue}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def response_messages(
    query: str, social_cue: str, task_cue: str, traits: Sequence[tuple[str, str, str]]
) -> Messages:
    """Step 3: the answer written from cues and traits.

    ``traits`` holds ``(cue, pole, reason)`` triples. The requested layout follows the paper's
    order: social cue, task cue, traits, a plan per trait, the final answer, then a rationale.
    """
    lines = [f"- {pole_label(pole)} (from the {cue} cue): {reason}".rstrip(": ") for cue, pole, reason in traits]
    system = (
        "You are an assistant whose personality adapts to the situation. Think it through in this "
        "order, under a heading '## Analysis':\n"
        "1. what the social cue says about the person's tone and feelings, and what approach they "
        "will welcome;\n"
        "2. what the task cue says about the goal and the qualities a good answer needs;\n"
        "3. the traits to show and why;\n"
        "4. for each trait, one concrete way it will shape your wording, tone or structure.\n"
        "Then write the reply the person will actually read under '## Response', and finish with "
        "'## Rationale': two or three sentences on how the reply expresses the traits."
    )
    user = (
        f"Message:\n{query}\n\nSocial cue: {social_cue}\nTask cue: {task_cue}\n"
        "Traits to show:\n" + "\n".join(lines)
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def single_call_messages(query: str) -> Messages:
    """All three steps in one request (``--single-call``), in a headed layout the parser reads."""
    system = (
        "You are an assistant whose personality adapts to the situation, following Trait "
        "Activation Theory. For the message below, write these sections in order:\n"
        "Social Cue: how the person sounds and feels and what they want from the exchange.\n"
        "Task Cue: what the job is, how hard it is and what a good outcome looks like.\n"
        "Based on social cue: bullet points naming the poles the social cue calls for, each like "
        "'- High Agreeableness: reason'.\n"
        "Based on task cue: the same for the task cue.\n"
        f"Use only these ten poles, never both poles of one trait:\n{_pole_menu()}\n"
        "## Response: the reply the person will read, written with those traits.\n"
        "## Rationale: two or three sentences on how the reply expresses the traits."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Message:\n{query}"}]


def direct_messages(query: str) -> Messages:
    """Baseline ``direct``: the query alone, no guidance."""
    return [{"role": "user", "content": query}]


def human_like_messages(query: str) -> Messages:
    """Baseline ``human_like``: one fixed casual, friendly instruction."""
    return [{"role": "system", "content": HUMAN_LIKE_INSTRUCTION}, {"role": "user", "content": query}]


# ---------------------------------------------------------------------------- constrained prompts
# Small models follow short, single-purpose instructions best; each prompt asks for one thing.


def local_cue_messages(query: str, kind: str) -> Messages:
    """One short sentence describing the social (``kind="social"``) or task cue."""
    if kind == "social":
        ask = "In one sentence, describe how the person who wrote this message feels and what tone they need."
    elif kind == "task":
        ask = "In one sentence, describe what the person is asking for and what a good answer must do."
    else:
        raise ValueError(f"cue kind must be 'social' or 'task', got {kind!r}")
    return [{"role": "user", "content": f'Message: "{query}"\n\n{ask}'}]


def pole_choice_messages(query: str, kind: str, cue: str) -> Messages:
    """Prompt whose continuation is scored against each pole option (``pole_option_text``)."""
    what = "how the person feels" if kind == "social" else "what the task needs"
    user = (
        f'Message: "{query}"\n'
        f"About {what}: {cue}\n\n"
        "Which personality should the assistant show when replying? Answer with one trait."
    )
    return [{"role": "user", "content": user}]


def pole_option_text(pole: str) -> str:
    """The continuation scored for one pole in constrained mode."""
    return f"{pole_label(pole)}: {POLE_DESCRIPTIONS[pole]}."


def local_response_messages(query: str, social_cue: str, task_cue: str, poles: Sequence[str]) -> Messages:
    """Step 3 for small teachers: the persona goes into the system turn, the query stays plain."""
    style = "; ".join(POLE_DESCRIPTIONS[p] for p in poles)
    system = (
        f"You are a helpful assistant. In this reply be {style}. "
        f"The person: {social_cue} The task: {task_cue} Answer in a short paragraph."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": query}]


def local_rationale_messages(response: str, poles: Sequence[str]) -> Messages:
    """A one-sentence explanation of how a reply shows the chosen traits."""
    names = ", ".join(pole_label(p) for p in poles)
    user = f'Reply: "{response}"\n\nIn one sentence, explain how this reply shows {names}.'
    return [{"role": "user", "content": user}]

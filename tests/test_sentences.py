"""The shared sentence splitter and its two users: the KV prompt's sentence map and the prompt site."""

from __future__ import annotations

import pytest
from conftest import CharTokenizer

from flowsieve.inputs import build_prompt
from flowsieve.inputs import sentence_index as inputs_sentence_index
from flowsieve.methods.prompt.base import group_tokens, sentence_spans, tokenize_spans
from flowsieve.sentences import sentence_index


def split(text: str) -> list[str]:
    spans = sentence_spans(text)
    assert "".join(text[a:b] for a, b in spans) == text  # the spans tile the text
    return [text[a:b] for a, b in spans]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        # initials are not sentence ends
        ("E. B. White wrote it.", ["E. B. White wrote it."]),
        ("I met J. R. R. Tolkien. He smiled.", ["I met J. R. R. Tolkien.", " He smiled."]),
        ("(J. Smith) said so. Done", ["(J. Smith) said so.", " Done"]),
        # a closing curly quote or bracket belongs to the sentence that ends
        ("He said “Stop.” Then he left.", ["He said “Stop.”", " Then he left."]),
        ("She wrote ‘no.’ Fine.", ["She wrote ‘no.’", " Fine."]),
        ('A "quote." B (aside.) C [x!] D', ['A "quote."', " B (aside.)", " C [x!]", " D"]),
        # abbreviations, whatever their case, after an opening bracket too
        (
            "Mr. and Mrs. Smith met Dr. Jones on St. James St. at noon. Ok.",
            ["Mr. and Mrs. Smith met Dr. Jones on St. James St. at noon.", " Ok."],
        ),
        (
            "Fruit, e.g. apples, i.e. food (cf. pears), vs. MR. X. End.",
            ["Fruit, e.g. apples, i.e. food (cf. pears), vs. MR. X. End."],
        ),
        ("Ask (e.g. now) later. Go", ["Ask (e.g. now) later.", " Go"]),
        # runs of terminal marks are one end
        ("Really?! Yes!!! No?", ["Really?!", " Yes!!!", " No?"]),
        ("Wait... then go. Hm… ok", ["Wait...", " then go.", " Hm…", " ok"]),
        # a mark not followed by white space does not end a sentence
        ("Pi is 3.14 today.Not cut. x", ["Pi is 3.14 today.Not cut.", " x"]),
        # a run of line breaks (with the spaces before it) starts the next sentence, even after an
        # abbreviation or with no mark at all
        ("One\ntwo\n\n\nthree", ["One", "\ntwo", "\n\n\nthree"]),
        ("Dr.\nWho  \n \n is. Here", ["Dr.", "\nWho", "  \n \n is.", " Here"]),
        ("Yes. \r\nNo", ["Yes.", " \r\nNo"]),
    ],
)
def test_sentence_spans(text, want):
    assert split(text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", []),
        ("   ", ["   "]),
        ("x", ["x"]),
        ("  Lead. Two.", ["  Lead.", " Two."]),  # leading white space: the first sentence's
        ("End. \n ", ["End. \n "]),  # trailing white space: the last sentence's
        ("\nA.\n", ["\nA.\n"]),
    ],
)
def test_white_space_at_the_edges(text, want):
    assert split(text) == want


def test_sentence_index_maps_token_starts():
    text = "He said “Stop.” Then E. B. White left?! Ok\n\nNext"
    spans = sentence_spans(text)
    assert len(spans) == 4
    starts = list(range(len(text) + 1))  # every character, and one past the end
    got = sentence_index(text, starts)
    want = [next(k for k, (a, b) in enumerate(spans) if a <= s < b) for s in range(len(text))]
    assert list(got) == [*want, len(spans) - 1]
    assert got[text.index(" Then")] == 1 and got[text.index("”")] == 0  # space opens the next one
    assert sentence_index("", [0, 3]) == (0, 0)
    assert inputs_sentence_index is sentence_index  # the prompt builder's name is the shared one


TEXT = (
    "Dr. E. B. White wrote “Stop.” Then he left?! Did he… return? Yes (mostly.)\n"
    "Mr. Smith, i.e. the tenant, paid. Fine.\n\n"
    "A new paragraph with Mrs. Jones vs. St. Clair... The end"
)


def test_kv_prompt_and_prompt_site_cut_the_same_places():
    tok = CharTokenizer()
    # the prompt site: one token per character, grouped by sentence_spans
    _, spans = tokenize_spans(tok, TEXT)
    site = group_tokens(spans, sentence_spans(TEXT)).tolist()
    assert split(TEXT) == [
        "Dr. E. B. White wrote “Stop.”",
        " Then he left?!",
        " Did he…",
        " return?",
        " Yes (mostly.)",
        "\nMr. Smith, i.e. the tenant, paid.",
        " Fine.",
        "\n\nA new paragraph with Mrs. Jones vs. St. Clair...",
        " The end",
    ]
    assert site == [k for k, (a, b) in enumerate(sentence_spans(TEXT)) for _ in range(a, b)]
    # the KV prompt: build_prompt's per-token map, without and with a question after the context
    alone = build_prompt(tok, TEXT, chat=False)
    assert list(alone.sentences) == site
    asked = build_prompt(tok, TEXT, "Who left?", chat=False)
    a, b = asked.context
    assert list(asked.sentences[a:b]) == site
    assert asked.sentences[b] == site[-1] + 1  # the blank line before the question starts one

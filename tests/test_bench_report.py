"""The bench report: plots, tables, ratios, escaping, and the page as headless Chromium renders it."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from flowsieve import FlowsieveError
from flowsieve.bench.report import write_report
from flowsieve.bench.report_data import line_label, sections, task_label
from flowsieve.bench.report_plots import pareto_front
from flowsieve.bench.store import Store

EVIL = "<script>document.title='PWNED'</script>"
EVIL_ERR = "<img src=x onerror=\"document.title='PWNED'\"> failed & stopped"
METHODS = {"flowcut": 1.0, "h2o": 0.6, EVIL: 0.3}  # how much of the full score a method keeps at 0.1
KEEPS = (0.5, 0.25, 0.1)


def _row(**kw) -> dict:
    base = {
        "model": "smollm2",
        "system": "flowsieve",
        "site": "prefill",
        "budget": 0,
        "task": "needle",
        "seed": 0,
        "max_new_tokens": 32,
        "prompt_tokens": 1000,
        "peak_rss_mb": 800.0,
        "new_tokens": 5,
        "versions": {"torch": "2.13.0", "transformers": "5.24.0", "flowsieve": "0.1.0"},
        "git_hash": "abc123",
        "run_id": 1,
    }
    return base | kw


def fill(store: Store, n_items: int = 4) -> None:
    """Two needle lengths, two modes, full + three methods + two peers, a budget cell, failures."""
    rid = store.start_run(
        {"methods": ["full", *METHODS], "keeps": list(KEEPS)},
        {"platform": "Linux-test", "cpu_count": 2, "torch_threads": 2, "memory_gb": 8},
        {"torch": "2.13.0"},
        "abc123",
    )
    for length in (1000, 2000):
        params = {"length": length, "depth": None}
        for mode in ("query_aware", "query_agnostic"):
            for i in range(n_items):
                item = f"needle-{length}-{i}"
                ok = 1.0 if i < n_items - 1 else 0.0  # the full run misses the last item
                common = {"task_params": params, "item_id": item, "mode": mode, "run_id": rid}
                store.add(
                    _row(
                        **common,
                        method="full",
                        site="none",
                        keep=1.0,
                        prediction="4817",
                        score=ok,
                        kept_tokens=1000,
                        kv_bytes=4_000_000,
                        kv_bytes_full=4_000_000,
                        prefill_s=2.0,
                        decode_tok_s=20.0,
                        extra={"token_ids": [1, 2, 3, 4]},
                    )
                )
                for method, strength in METHODS.items():
                    for keep in KEEPS:
                        score = ok if (i + keep * 10 * strength) % 3 else 0.0
                        store.add(
                            _row(
                                **common,
                                method=method,
                                keep=keep,
                                prediction=f"code {method}",
                                score=score,
                                kept_tokens=int(1000 * keep),
                                kv_bytes=int(4_000_000 * keep),
                                kv_bytes_full=4_000_000,
                                prefill_s=1.0,
                                decode_tok_s=40.0,
                                extra={"token_ids": [1, 2, 9, 9]},
                            )
                        )
                store.add(
                    _row(
                        **common,
                        method="flowcut",
                        keep=0.0,
                        budget=128,
                        prediction="x",
                        score=0.5,
                        kept_tokens=128,
                        kv_bytes=512_000,
                        kv_bytes_full=4_000_000,
                        prefill_s=1.5,
                        decode_tok_s=45.0,
                    )
                )
                for keep in KEEPS:
                    store.add(
                        _row(
                            **common,
                            system="kvpress",
                            method="snapkv",
                            keep=keep,
                            prediction="y",
                            score=ok * keep,
                            kept_tokens=int(1000 * keep),
                            kv_bytes=int(4_000_000 * keep),
                            kv_bytes_full=4_000_000,
                            prefill_s=2.2,
                            decode_tok_s=30.0,
                            versions={"kvpress": "0.9.0", "transformers": "5.2.0"},
                        )
                    )
    store.add_failure({"model": "smollm2", "system": "llmlingua"}, "peer runner not available: " + EVIL_ERR)
    store.add_failure(
        {
            "model": "smollm2",
            "system": "flowsieve",
            "method": "tova",
            "site": "decode",
            "keep": 0.1,
            "budget": 0,
            "task": "needle",
            "item_id": "needle-1000-0",
            "mode": "query_aware",
            "seed": 0,
            "max_new_tokens": 32,
        },
        "RuntimeError: shapes do not match",
    )
    store.finish_run(rid, planned=200, written=190, failed=2)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "results.sqlite"
    with Store(path) as s:
        fill(s)
    return path


@pytest.fixture(scope="module")
def index(db, tmp_path_factory) -> Path:
    """The report of :func:`fill`'s store, rendered once for the tests that read it."""
    return write_report(db, tmp_path_factory.mktemp("report") / "report")


def test_labels_and_frontier():
    assert task_label("needle", {"length": 2000, "depth": None}) == "needle (length=2000)"
    assert task_label("multidoc_qa", {}) == "multidoc_qa"
    assert line_label({"system": "flowsieve", "method": "full", "site": "none"}) == "full"
    assert line_label({"system": "flowsieve", "method": "h2o", "site": "decode"}) == "h2o@decode"
    assert line_label({"system": "kvpress", "method": "tova", "site": "prefill"}) == "kvpress:tova"
    pts = [(1.0, 0.5), (2.0, 0.4), (0.5, 0.2), (3.0, 0.9), (1.0, 0.7)]
    assert pareto_front(pts) == [(0.5, 0.2), (1.0, 0.7), (3.0, 0.9)]


def test_sections_group_by_task_variant_and_mode(db):
    with Store(db, create=False) as s:
        secs = sections(s.rows())
    assert [x.label for x in secs] == ["needle (length=1000)", "needle (length=2000)"]
    sec = secs[0]
    assert list(sec.modes) == ["query_aware", "query_agnostic"]
    full = sec.full("query_aware")
    assert full is not None and len(full.rows) == 4 and full.mean("score") == 0.75


def _imgs(page: str) -> list[bytes]:
    return [
        base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


def test_report_renders(index):
    out = index.parent
    assert index.name == "index.html" and index.is_file()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4  # score vs keep and Pareto for each needle length
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as im:
            im.verify()
    page = index.read_text(encoding="utf-8")
    imgs = _imgs(page)
    assert len(imgs) == 4 and sorted(imgs) == sorted(p.read_bytes() for p in pngs)  # self-contained
    with Image.open(io.BytesIO(imgs[0])) as im:
        assert im.size[0] > 400 and im.size[1] > 300
    assert 'src="http' not in page and "<script" not in page.lower()
    # tables: scores, best per keep, ratios, for each section and mode
    assert page.count('<table class="scores">') == 4
    assert page.count('<table class="best">') == 4
    assert page.count('<table class="ratios">') == 4
    assert "keep 0.5" in page and "keep 0.1" in page and "budget 128" in page
    assert "flowcut@prefill" in page and "kvpress:snapkv" in page and "n=4" in page
    # settings and failures
    assert "abc123" in page and "5.24.0" in page and "0.9.0" in page and "Linux-test" in page
    assert "peer runner not available" in page and "shapes do not match" in page
    assert "Peers that failed" in page


def test_ratios_against_the_same_items(index):
    page = index.read_text(encoding="utf-8")
    ratios = page.split('<table class="ratios">')[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", ratios)
    flowcut = next(r for r in rows if "flowcut@prefill</td><td>keep 0.25" in r)
    cells = re.findall(r"<td>(.*?)</td>", flowcut)
    # method, setting, paired, score, full score, prefill, decode, kv, rss, token agreement,
    # word agreement, kept
    assert cells[2] == "4" and cells[4] == "0.750"
    assert cells[5:9] == ["0.50×", "2.00×", "0.25×", "1.00×"]
    assert cells[9] == "0.50" and cells[11] == "0.25"
    assert cells[10] == "0.00"  # its answers differ from the full run's from the first word on


def test_word_agreement():
    from flowsieve.bench.report_data import _prefix_agreement, _words

    full, half = _words("The code is 4817."), _words("the code is: 48")
    assert _prefix_agreement(half, full) == 0.75 and _prefix_agreement(full, full) == 1.0
    assert _words("") is None


def test_strings_from_the_store_are_escaped(index):
    page = index.read_text(encoding="utf-8")
    assert EVIL not in page and "<img src=x" not in page
    assert "&lt;script&gt;document.title=&#x27;PWNED&#x27;&lt;/script&gt;@prefill" in page
    assert (
        "&lt;img src=x onerror=&quot;document.title=&#x27;PWNED&#x27;&quot;&gt; failed &amp; stopped" in page
    )


def test_empty_store_and_missing_db(tmp_path):
    empty = tmp_path / "empty.sqlite"
    Store(empty).close()
    page = write_report(empty, tmp_path / "r").read_text(encoding="utf-8")
    assert "no results yet" in page and "<img" not in page
    with pytest.raises(FlowsieveError, match="no results database"):
        write_report(tmp_path / "missing.sqlite", tmp_path / "r2")


# --- Chromium ---------------------------------------------------------------------------------------


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.scripts = 0
        self.title = ""
        self.text: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self.tables.append(a.get("class", ""))
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "script":
            self.scripts += 1
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        self.text.append(data)


@pytest.mark.browser
def test_browser_renders_the_report(index, tmp_path):
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(
            "Chromium is not installed (scripts/setup.sh installs it; on Debian: apt-get install chromium)"
        )
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
        "--dump-dom",
        index.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    dom = _Dom()
    dom.feed(proc.stdout)
    assert dom.title == "flowsieve bench report"
    assert dom.scripts == 0
    assert (
        dom.tables.count("scores") == 4 and dom.tables.count("ratios") == 4 and dom.tables.count("best") == 4
    )
    assert "runs" in dom.tables and "peer-failures" in dom.tables and "cell-failures" in dom.tables
    assert len(dom.imgs) == 4 and all(i["src"].startswith("data:image/png;base64,") for i in dom.imgs)
    text = "".join(dom.text)
    assert EVIL in text and EVIL_ERR in text  # shown as text, not run or turned into elements
    assert "flowcut@prefill" in text and "kvpress:snapkv" in text


def test_markdown_tables(index):
    md = (index.parent / "results.md").read_text(encoding="utf-8")
    assert md.count("#### smollm2 · needle (length=") == 4  # 2 lengths x 2 modes
    head = md.split("#### ")[1]
    assert "| method | keep 0.5 | keep 0.25 | keep 0.1 |" in head
    full_line = next(x for x in head.splitlines() if x.startswith("| full context |"))
    assert "0.75 (n=4)" in full_line
    assert re.search(r"\| kvpress:snapkv \| [0-9.]+ \([0-9.]+ of full, n=4\)", head)
    assert "best flowsieve" in head and "best kvpress" in head


def test_new_measures_and_lm_columns(tmp_path):
    """token_agreement and kl_answer_start as columns of every ratio table; bits per byte and
    Information Capacity where the section is the lm task."""
    from flowsieve.bench.report_data import information_capacity
    from flowsieve.bench.tasks.lm import information_capacity as ic

    path = tmp_path / "r.sqlite"
    lm = {"task": "lm", "task_params": {"length": 512, "continuation": 64}, "mode": "query_aware"}
    with Store(path) as store:
        for i in range(2):
            for method, keep, bpb, kl in (("full", 1.0, 1.0, 0.0), ("snapkv", 0.25, 1.5, 0.2)):
                extra = {
                    "nll_bits": 64 * bpb * 4,
                    "scored_tokens": 64,
                    "scored_bytes": 256,
                    "flops_per_token": 2.0**20,
                }
                store.add(
                    _row(
                        **lm,
                        method=method,
                        site="none" if method == "full" else "prefill",
                        keep=keep,
                        item_id=f"lm-{i}",
                        prediction="",
                        score=2**-bpb,
                        bits_per_byte=bpb,
                        kl_answer_start=kl,
                        kept_tokens=int(512 * keep),
                        kv_bytes=int(1000 * keep),
                        prefill_s=1.0,
                        extra=extra,
                    )
                )
                store.add(
                    _row(
                        method=method,
                        site="none" if method == "full" else "prefill",
                        keep=keep,
                        item_id=f"needle-{i}",
                        mode="query_agnostic",
                        task_params={"length": 100},
                        prediction="4817",
                        score=1.0,
                        token_agreement=1.0 if method == "full" else 0.25,
                        kl_answer_start=kl,
                        kept_tokens=int(100 * keep),
                        kv_bytes=int(1000 * keep),
                        prefill_s=1.0,
                        extra={"token_ids": [1, 2, 3, 4], "agree_tokens": 16},
                    )
                )
        rows = store.rows()
    want = ic([(256.0 * 1.5, 64, 256)] * 2, 2.0**20)
    assert information_capacity([r for r in rows if r["task"] == "lm" and r["method"] == "snapkv"]) == want
    assert information_capacity([r for r in rows if r["task"] == "needle"]) is None
    page = write_report(path, tmp_path / "out").read_text(encoding="utf-8")
    tables = [t.split("</table>")[0] for t in page.split('<table class="ratios">')[1:]]
    lm_table = next(t for t in tables if "bits / byte" in t)
    needle_table = next(t for t in tables if "bits / byte" not in t)
    assert "token agreement, first 16 tokens" in needle_table and "KL at answer start (nats)" in needle_table
    snap = next(r for r in re.findall(r"<tr>(.*?)</tr>", needle_table) if "snapkv@prefill" in r)
    cells = re.findall(r"<td>(.*?)</td>", snap)
    assert cells[12:14] == ["0.25", "0.2000"]
    snap = next(r for r in re.findall(r"<tr>(.*?)</tr>", lm_table) if "snapkv@prefill" in r)
    cells = re.findall(r"<td>(.*?)</td>", snap)
    assert cells[13:16] == ["0.2000", "1.5000", f"{want:.4f}"] and "Information Capacity" in lm_table
    md = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert "Bits per byte of the held-out continuation" in md and "1.500 (IC " in md

"""Render a trace (the dict :func:`flowsieve.trace.trace` returns) as one self-contained HTML page.

The page shows:

- the tokens as running text, each shaded by the selected signal's score at the selected layer
  (normalised per layer), with the exact score in a tooltip and the question span, the relay token
  and the layer's sink tokens marked;
- a layer slider (with previous/next buttons and the left/right arrow keys), a signal selector and a
  choice of per-layer scale;
- an overview of the selected signal over every layer and token position;
- the layer x head map coloured by attention mass on the first token (or another head statistic),
  with dormant heads outlined;
- the top tokens of the selected signal, the sink tokens, the settings and a legend of the signals.

The page loads nothing from the network: the CSS and JavaScript (``assets/trace.css`` and
``assets/trace.js`` in this package) are inlined and the trace is embedded as JSON in a
``<script type="application/json">`` element with ``<``, ``>``, ``&``, U+2028 and U+2029 escaped.
Token strings are untrusted; the script renders them as text nodes only, and a Content
Security Policy allows only the page's own script to run. The output is pure ASCII.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import math
from importlib import resources
from typing import Any

__all__ = ["render_trace_html"]

_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


@functools.cache
def _asset(name: str) -> str:
    """The text of ``assets/<name>`` (the page's stylesheet or script), shipped with the package."""
    return resources.files("flowsieve").joinpath("trace", "assets", name).read_text(encoding="ascii")


def _style() -> str:
    """The content of the page's ``<style>`` element."""
    return "\n" + _asset("trace.css")


def _script() -> str:
    """The content of the page's ``<script>`` element; the Content Security Policy pins its hash."""
    return "\n" + _asset("trace.js")


_BODY = r"""<header>
<h1 id="title">flowsieve trace</h1>
<div class="meta" id="meta"></div>
</header>
<div id="error" role="alert"></div>
<div id="controls">
<label>signal <select id="signal"></select></label>
<span><button id="prev" type="button" title="previous layer (left arrow)">&#9664;</button>
<input id="layer" type="range" min="0" max="0" step="1" value="0" aria-label="layer">
<button id="next" type="button" title="next layer (right arrow)">&#9654;</button></span>
<span id="layer-label">layer 0</span>
<label>scale <select id="scale">
<option value="robust">max without sinks &amp; relay</option>
<option value="max">layer max</option>
<option value="rank">rank in layer</option>
</select></label>
<label><input id="bounds" type="checkbox" checked> token boundaries</label>
<span class="hint">&#8592; &#8594; change layer</span>
</div>
<main>
<div>
<section class="panel">
<h2 id="tokens-heading">Tokens</h2>
<div id="inspector"><div id="inspector-text"></div><canvas id="spark" width="160" height="34"
 title="selected signal for this token across layers (dot: current layer)"></canvas></div>
<div id="tokens" class="bounds"></div>
<div class="marks">
<span><span class="colorbar" id="token-bar"></span> low &#8594; high</span>
<span><span class="swatch sw-q"></span>question</span>
<span><span class="swatch sw-relay"></span>relay token</span>
<span><span class="swatch sw-sink"></span>sink at this layer</span>
<span><span class="tok nl"></span> newline</span>
</div>
<div class="sub" id="scale-text" style="margin-top:6px"></div>
</section>
<section class="panel">
<h2 id="overview-heading">All layers</h2>
<div class="sub">Each column is the highest shade among the tokens it covers; the box marks the current layer.
Click to jump to a layer and token.</div>
<div id="overview-wrap"><canvas id="overview" width="1" height="1"></canvas>
<div id="overview-cursor"></div></div>
<div id="overview-axis"><span>token 0</span><span id="overview-axis-end"></span></div>
</section>
<div class="row2">
<section class="panel">
<h2>Signals</h2>
<dl id="signals"></dl>
</section>
<section class="panel">
<h2>Settings</h2>
<table><tbody id="settings-body"></tbody></table>
</section>
</div>
</div>
<div>
<section class="panel">
<h2>Sink / dormant map (layers &#215; heads)</h2>
<div class="sub">Colour: <select id="head-metric"></select></div>
<div id="heads"></div>
<div class="marks">
<span><span id="head-scale"></span><span class="colorbar" id="head-bar"></span>
<span id="head-scale-max"></span></span>
<span><span class="swatch sw-dormant"></span>dormant head</span>
</div>
<div class="sub" id="dormant-note" style="margin-top:6px"></div>
</section>
<section class="panel">
<h2>Top tokens</h2>
<div class="sub"><select id="top-source">
<option value="trace">saved in the trace</option>
<option value="layer">at the current layer</option>
</select> <span id="top-note"></span></div>
<table><thead><tr><th class="num">#</th><th class="num">index</th><th>token</th>
<th class="num">score</th></tr></thead>
<tbody id="top-body"></tbody></table>
</section>
<section class="panel">
<h2>Sink tokens</h2>
<div class="sub" id="sink-criterion"></div>
<table><thead><tr><th class="num">index</th><th>token</th><th>layers</th><th class="num">fraction</th>
<th class="num">mass</th></tr></thead><tbody id="sinks-body"></tbody></table>
</section>
</div>
</main>
"""


def _plain(x: Any) -> Any:
    """A copy of ``x`` made of JSON types: non-finite floats become None, arrays become lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (str, int)):
        return x
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    tolist = getattr(x, "tolist", None)
    if callable(tolist):
        return _plain(tolist())
    return str(x)


def trace_json(data: Any) -> str:
    """``data`` as compact ASCII JSON (NaN and infinities become null): the trace file format."""
    try:
        return json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        return json.dumps(_plain(data), ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def _script_json(data: Any, text: str | None = None) -> str:
    """``data`` (or its JSON ``text``) as ASCII JSON that is safe inside a ``<script>`` element."""
    if text is None:
        text = trace_json(data)
    for ch, esc in _JSON_ESCAPES.items():
        text = text.replace(ch, esc)
    return text


def _ascii_text(s: str) -> str:
    """Escape ``s`` for HTML text and turn every non-ASCII character into a character reference."""
    return html.escape(s).encode("ascii", "xmlcharrefreplace").decode("ascii")


def render_trace_html(trace: dict[str, Any], data_json: str | None = None) -> str:
    """Render ``trace`` as a self-contained, offline HTML page and return its text (pure ASCII).

    Args:
        trace: the dict :func:`flowsieve.trace.trace` returns (or the same read back from JSON).
            Keys the page does not use are kept in the embedded data and otherwise ignored;
            missing keys leave their part of the page empty.
        data_json: ``trace_json(trace)`` when the caller already has it (saves serialising twice).

    Returns:
        The HTML document. Write it with any encoding, e.g. ``path.write_text(html, "utf-8")``.

    Raises:
        TypeError: ``trace`` is not a dict.
    """
    if not isinstance(trace, dict):
        raise TypeError(f"trace must be a dict, got {type(trace).__name__}")
    model = trace.get("model")
    title = "flowsieve trace" + (f": {model}" if model not in (None, "") else "")
    script = _script()
    digest = base64.b64encode(hashlib.sha256(script.encode("ascii")).digest()).decode("ascii")
    csp = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_ascii_text(title)}</title>\n"
        f"<style>{_style()}</style>\n"
        "</head>\n<body>\n"
        f"{_BODY}"
        f'<script type="application/json" id="trace-data">{_script_json(trace, data_json)}</script>\n'
        f"<script>{script}</script>\n"
        "</body>\n</html>\n"
    )

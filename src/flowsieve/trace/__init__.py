"""The trace: how information flows between the tokens of one prompt, per layer and head.

:func:`trace` records it (:mod:`.record`); :func:`render_trace_html` writes it as one
self-contained page (:mod:`.page`, with its script and stylesheet in ``assets/``) and
:func:`trace_json` as JSON.
"""

from flowsieve.trace.page import render_trace_html, trace_json
from flowsieve.trace.record import SIGNALS, TraceConfig, build_input, trace

__all__ = ["SIGNALS", "TraceConfig", "build_input", "render_trace_html", "trace", "trace_json"]

"""Errors a user can act on. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FlowsieveError(ValueError):
    """Bad input or an unsupported request, with a message meant for the user."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""`` when nothing is close."""
    choices = list(choices)
    low = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(low), n=1, cutoff=0.5)
    if not close:
        # prefix matches ("smol" -> "smollm2") are what people type most often
        close = [c for c in low if c.startswith(name.lower()) or name.lower().startswith(c)][:1]
    return f" (did you mean '{low[close[0]]}'?)" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> FlowsieveError:
    choices = sorted(choices)
    return FlowsieveError(
        f"unknown {kind} '{name}'{did_you_mean(name, choices)}; known: {', '.join(choices)}"
    )

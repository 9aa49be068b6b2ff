"""The ``compress`` subcommand: ``flowsieve compress --scorer NAME --keep R [--question Q] --text-file F``.

Wire it into the main parser with :func:`add_commands`. It prints the compressed prompt, or with
``--json`` the object ``{text, kept_tokens, total_tokens, ratio, seconds, scorer, model}``.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from typing import Any

from flowsieve.errors import FlowsieveError


def _read_text(args: argparse.Namespace) -> str:
    if args.text_file is not None:
        if args.text_file == "-":
            return sys.stdin.read()
        p = Path(args.text_file)
        if not p.is_file():
            raise FlowsieveError(f"text file not found: {p}")
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FlowsieveError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if args.text is not None:
        return str(args.text)
    raise FlowsieveError("no input: give --text-file FILE or --text TEXT")


def _setting(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value); the value is a Python literal when it parses as one."""
    key, eq, raw = item.partition("=")
    if not eq or not key.strip():
        raise FlowsieveError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        value: Any = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False, "none": None}.get(raw.strip().lower(), raw)
    return key.strip(), value


def cmd_compress(args: argparse.Namespace) -> int:
    from flowsieve.methods.prompt import SCORERS
    from flowsieve.models import load
    from flowsieve.sites.prompt import compress_prompt

    text = _read_text(args)
    if not text.strip():
        raise FlowsieveError("the text is empty")
    cls = SCORERS.get(args.scorer)  # fail on a bad name before loading a model
    settings = dict(_setting(s) for s in args.set or [])
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise FlowsieveError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load(args.model, trust_remote_code=args.trust_remote_code)
    load_s = time.perf_counter() - t0
    force_tokens = tuple(args.force_token) if args.force_token is not None else ("\n", "?")
    if args.no_force_tokens:
        force_tokens = ()
    result = compress_prompt(
        text,
        scorer=args.scorer,
        keep=args.keep,
        question=args.question,
        model=model if cls.needs_model else None,
        tokenizer=tok,
        force_tokens=force_tokens,
        force_words=tuple(args.force_word or ()),
        **settings,
    )
    if args.json:
        out = result.to_dict() | {"model": args.model, "load_seconds": round(load_s, 3)}
        print(json.dumps(out, ensure_ascii=False, indent=2))
    else:
        sys.stdout.write(result.text)
        if not result.text.endswith("\n"):
            sys.stdout.write("\n")
        if not args.quiet:
            print(
                f"kept {result.kept_tokens}/{result.total_tokens} tokens (ratio {result.ratio:.3f}) "
                f"in {result.seconds:.2f}s with {args.scorer}",
                file=sys.stderr,
            )
    return 0


def add_commands(subparsers: Any) -> None:
    """Add the ``compress`` subcommand to an ``argparse`` subparsers object."""
    from flowsieve.methods.prompt import SCORERS
    from flowsieve.models import DEFAULT_MODEL

    c = subparsers.add_parser(
        "compress",
        help="compress a prompt (keep the tokens that matter)",
        description="Drop tokens, words or sentences from a prompt before a model reads it. The question "
        "is kept whole after the context; newlines and question marks are kept unless told otherwise.",
    )
    c.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"compressor model: bundled name, local path or HF id (default {DEFAULT_MODEL}); tokens are "
        "counted with its tokenizer",
    )
    c.add_argument("--scorer", default="selfinfo", help=f"one of: {', '.join(SCORERS)} (default selfinfo)")
    c.add_argument(
        "--keep",
        type=float,
        default=0.33,
        help="share of the prompt's tokens to keep, in (0, 1] (default 0.33)",
    )
    c.add_argument("--question", help="question appended after the context, never compressed")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--text-file", help="UTF-8 text file ('-' reads stdin)")
    src.add_argument("--text", help="the text itself")
    c.add_argument(
        "--force-token",
        action="append",
        metavar="S",
        help="keep every token containing S (repeatable; replaces the default newline and '?')",
    )
    c.add_argument("--no-force-tokens", action="store_true", help="keep no token for its characters alone")
    c.add_argument("--force-word", action="append", metavar="W", help="always keep this word (repeatable)")
    c.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a scorer setting, e.g. --set window=100 (repeatable)",
    )
    c.add_argument(
        "--json", action="store_true", help="print {text, kept_tokens, total_tokens, ratio, seconds}"
    )
    c.add_argument("--threads", type=int, help="torch CPU threads")
    c.add_argument(
        "--trust-remote-code", action="store_true", help="allow modelling code shipped with a checkpoint"
    )
    c.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    c.set_defaults(func=cmd_compress)

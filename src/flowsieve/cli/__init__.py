"""The ``flowsieve`` command line: one entry point, one subcommand per job.

Bad input ends with exit status 2 and one line on stderr (``flowsieve: error: ...``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flowsieve.errors import FlowsieveError

log = logging.getLogger("flowsieve")


def _read_text(args: argparse.Namespace) -> str:
    if getattr(args, "text", None) is not None and getattr(args, "text_file", None) is not None:
        raise FlowsieveError("give either --text or --text-file, not both")
    if getattr(args, "text_file", None) is not None:
        p = Path(args.text_file)
        if str(p) == "-":
            return sys.stdin.read()
        if not p.is_file():
            raise FlowsieveError(f"text file not found: {p}")
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FlowsieveError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if getattr(args, "text", None) is not None:
        return str(args.text)
    raise FlowsieveError("no input: give --text-file FILE or --text TEXT")


def _write(path: str, content: str) -> None:
    """Write atomically: a crash never leaves a half-written output file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(p)


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        if n < 1:
            raise FlowsieveError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def cmd_models(args: argparse.Namespace) -> int:
    from flowsieve.models import cache_dir, model_status

    rows = model_status()
    if args.json:
        print(json.dumps({"cache_dir": str(cache_dir()), "models": rows}, indent=2))
        return 0
    for r in rows:
        flags = ("default " if r["default"] else "") + ("installed" if r["installed"] else "NOT INSTALLED")
        flags += ", converted" if r["cached"] else ""
        print(f"{r['name']:<13} {r['kind']:<9} {flags:<30} {r['description']}")
    print("\nAlso: any local model directory or Hugging Face id (needs the hub or a local HF cache).")
    print(f"Converted weights are cached in {cache_dir()}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from flowsieve.models import load
    from flowsieve.trace import TraceConfig, trace
    from flowsieve.trace.page import render_trace_html, trace_json

    text = _read_text(args)
    if not text.strip():
        raise FlowsieveError("the text is empty")
    if args.question is not None and not args.question.strip():
        raise FlowsieveError("the question is empty")
    if not args.json_out and not args.html_out and not args.print_json:
        raise FlowsieveError("nothing to write: give --json OUT.json and/or --html OUT.html")
    _set_threads(args.threads)
    cfg = TraceConfig(chunk=args.chunk, row_stride=args.row_stride, workers=args.scan_workers)
    t0 = time.perf_counter()
    model, tok = load(args.model, trust_remote_code=args.trust_remote_code)
    load_s = time.perf_counter() - t0
    result = trace(model, tok, text, args.question, config=cfg, progress=not args.quiet)
    result["timing"]["load_s"] = round(load_s, 3)
    data = trace_json(result)
    if args.json_out:
        _write(args.json_out, data)
    if args.html_out:
        _write(args.html_out, render_trace_html(result, data_json=data))
    summary = {
        "model": result["model"],
        "n_tokens": len(result["tokens"]),
        "n_layers": result["n_layers"],
        "sinks": [s["index"] for s in result["sinks"]["tokens"][:10]],
        "dormant_heads": len(result["dormant_heads"]),
        "top_flow": [t["token"] for t in result["top_tokens"]["flow_accumulated"][:10]],
        "json": args.json_out,
        "html": args.html_out,
        "timing": result["timing"],
    }
    if args.print_json:
        print(data)
    elif not args.quiet:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from flowsieve.sieve import DEFAULT_WHY, DEFAULTS, describe_default, list_methods

    rows = list_methods()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<14} {','.join(r['sites']):<16} {r['paper']}")
    for mode in DEFAULTS:
        print(f"default ({mode}): {describe_default(mode)} — {DEFAULT_WHY}")
    return 0


def _parse_options(items: list[str] | None) -> dict:
    out: dict = {}
    for it in items or []:
        if "=" not in it:
            raise FlowsieveError(f"--option expects NAME=VALUE, got '{it}'")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    from flowsieve.generate import generate
    from flowsieve.models import load
    from flowsieve.sieve import Sieve

    text = _read_text(args)
    if not text.strip():
        raise FlowsieveError("the prompt is empty")
    _set_threads(args.threads)
    sieve = None
    if args.sieve not in ("full", "none"):
        keep = args.keep if args.budget is None else None
        if keep is None and args.budget is None:
            raise FlowsieveError("give --keep R or --budget TOKENS with --sieve")
        sieve = Sieve(
            args.sieve,
            keep=keep,
            budget=args.budget,
            site=args.site,
            window=args.window,
            chunk=args.chunk,
            seed=args.seed,
            options=_parse_options(args.option),
            units=args.units,
            refeed=args.refeed,
            rows=args.rows,
        )
        if sieve.refeed and (not args.question or args.agnostic):
            # checked before the model loads (the prefill site would say the same after loading)
            raise FlowsieveError("refeed needs a question, in query-aware mode (--question, no --agnostic)")
    model, tok = load(args.model, trust_remote_code=args.trust_remote_code)
    mode = "query_aware" if args.question else "query_agnostic"
    if args.question and args.agnostic:
        mode = "query_agnostic"
    r = generate(
        model,
        tok,
        text,
        args.question,
        sieve=sieve,
        mode=mode,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
    )
    out = r.to_dict()
    name = sieve.resolve(mode).method if sieve is not None else "full"
    out.update({"model": args.model, "sieve": name, "site": args.site, "mode": mode})
    out.pop("token_ids", None)
    if args.json:
        print(json.dumps(out))
    else:
        print(r.text)
        print(
            f"[{r.kept_tokens}/{r.prompt_tokens} entries kept, KV {r.kv_bytes / 2**20:.1f}/"
            f"{r.kv_bytes_full / 2**20:.1f} MiB, prefill {r.prefill_s:.2f}s, {r.decode_tok_s:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from flowsieve import __version__
    from flowsieve.models import DEFAULT_MODEL

    p = argparse.ArgumentParser(
        prog="flowsieve",
        description="Measure how information flows between tokens in transformer models.",
    )
    p.add_argument("--version", action="version", version=f"flowsieve {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("models", help="list the bundled models", description="List the bundled models.")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser(
        "trace",
        help="trace information flow through a text",
        description="Score every token at every layer (relay flow, attention received, transitions), "
        "find attention sinks and dormant heads; write JSON and a self-contained HTML page.",
    )
    t.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"bundled name, local path or HF id (default {DEFAULT_MODEL})"
    )
    src = t.add_mutually_exclusive_group()
    src.add_argument("--text-file", help="UTF-8 text file ('-' reads stdin)")
    src.add_argument("--text", help="the text itself")
    t.add_argument("--question", help="a question appended after the text (after a blank line)")
    t.add_argument("--json", dest="json_out", metavar="OUT.json", help="write the full trace as JSON")
    t.add_argument("--html", dest="html_out", metavar="OUT.html", help="write a self-contained HTML page")
    t.add_argument("--print-json", action="store_true", help="print the full trace JSON on stdout")
    t.add_argument("--chunk", type=int, help="query rows per attention chunk (default: automatic)")
    t.add_argument(
        "--row-stride",
        type=int,
        default=1,
        help="1 = scan every query row (exact, default); k > 1 = scan every k-th chunk of rows and "
        "estimate attention received (faster on long texts)",
    )
    t.add_argument(
        "--scan-workers",
        type=int,
        default=None,
        help="threads scanning attention chunks in parallel, one torch thread each "
        "(default: one per torch thread)",
    )
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument(
        "--trust-remote-code", action="store_true", help="allow modelling code shipped with a checkpoint"
    )
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    t.set_defaults(func=cmd_trace)

    from flowsieve.cli.bench import add_commands as add_bench_commands

    add_bench_commands(sub)
    from flowsieve.cli.prompt import add_commands as add_prompt_commands

    add_prompt_commands(sub)

    ls = sub.add_parser(
        "ls", help="list the compression methods", description="List every method, its sites and paper."
    )
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_ls)

    g = sub.add_parser(
        "generate",
        help="generate with a compressed KV cache",
        description="Greedy generation with a sieve; prints the answer, or one JSON object with --json.",
    )
    g.add_argument("--model", default=DEFAULT_MODEL)
    gsrc = g.add_mutually_exclusive_group()
    gsrc.add_argument("--prompt-file", dest="text_file", help="the context (UTF-8 file, '-' = stdin)")
    gsrc.add_argument("--prompt", dest="text", help="the context itself")
    g.add_argument("--question", help="asked after the context; never evicted")
    g.add_argument("--agnostic", action="store_true", help="compress before the question is seen")
    g.add_argument(
        "--sieve",
        metavar="METHOD",
        default="default",
        help="method (flowsieve ls; default: the mode's default), 'full' = none",
    )
    g.add_argument(
        "--site",
        default="prefill",
        help="prefill (default), decode, select or layer (see `flowsieve ls`)",
    )
    g.add_argument(
        "--keep", type=float, default=0.25, metavar="R", help="share of KV entries to keep (default 0.25)"
    )
    g.add_argument("--budget", type=int, metavar="N", help="entries to keep per layer instead of --keep")
    g.add_argument(
        "--window",
        type=int,
        default=32,
        metavar="N",
        help="observation window of query-agnostic compression, always kept (default 32)",
    )
    g.add_argument(
        "--rows",
        choices=("question", "window"),
        default="question",
        help="query-aware observers: question span (default) or last --window tokens",
    )
    g.add_argument(
        "--chunk",
        type=int,
        metavar="N",
        help="prefill N tokens at a time, compressing after each (N >= --window)",
    )
    g.add_argument(
        "--units",
        choices=("token", "sentence"),
        default="token",
        help="keep single entries (default) or whole sentences (prefill site only)",
    )
    g.add_argument(
        "--refeed",
        action="store_true",
        help="query-aware prefill: feed the question again over the compressed cache",
    )
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of random methods (default 0)")
    g.add_argument("--option", action="append", metavar="NAME=VALUE", help="method option (repeatable)")
    g.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=True, help="use the chat template"
    )
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--threads", type=int)
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        from flowsieve.models import quiet_transformers

        quiet_transformers()
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except FlowsieveError as e:
        print(f"flowsieve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowsieve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

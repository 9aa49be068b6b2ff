"""Prompt building and measured greedy generation: the harness the CLI, the bench and the sieves share.

A prompt is a context (the part a sieve may compress) followed by a question (never compressed).
With ``chat=True`` both go into one user turn of the model's chat template, separated by a blank
line and followed by an instruction; the context's and question's token spans are located in the
rendered prompt through character offsets.

:func:`generate` runs prefill and greedy decoding by hand (no sampling) so that prefill time,
decode speed, KV-cache bytes and peak RSS are measured separately; with no sieve it produces
exactly the tokens of ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.models import context_length
from flowsieve.sentences import sentence_index

DEFAULT_INSTRUCTION = "Answer briefly."


@dataclass(frozen=True)
class Prompt:
    """Token ids of a prompt and where its parts are.

    Attributes:
        ids: the whole prompt, (T,).
        context: token span [start, end) of the context.
        question: token span [start, end) of the question (and what follows it), or None.
        split: index where a query-agnostic run splits the prompt: ``ids[:split]`` is compressed
            before the question is known, ``ids[split:]`` is appended afterwards.
        sentences: per token, the index of the sentence it starts in (the sentences of
            :func:`flowsieve.sentences.sentence_spans`); empty when unknown.
            Sieves with ``units="sentence"`` keep or drop whole sentences.
    """

    ids: tuple[int, ...]
    context: tuple[int, int]
    question: tuple[int, int] | None
    split: int
    sentences: tuple[int, ...] = ()

    def sentence_units(self) -> torch.Tensor:
        """(T,) long: :attr:`sentences` as a tensor; raises when the prompt was built without text."""
        if len(self.sentences) != len(self.ids):
            raise FlowsieveError(
                "this prompt has no sentence map (build it with flowsieve.generate.build_prompt)"
            )
        return torch.tensor(self.sentences, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)


def build_prompt(
    tokenizer: Any,
    context: str,
    question: str | None = None,
    *,
    chat: bool = True,
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> Prompt:
    """Render context + question (chat template or plain text) and locate the parts in tokens."""
    if context is None or not context.strip():
        raise FlowsieveError("the context is empty")
    if question is not None and not question.strip():
        raise FlowsieveError("the question is empty")
    ctx = context.strip()
    tail = ""
    if question:
        tail = "\n\n" + question.strip()
        if instruction:
            tail += "\n" + instruction
    user = ctx + tail
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise FlowsieveError("this tokenizer has no chat template; use chat=False (--no-chat)")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        c0 = text.find(user)
        if c0 < 0:
            raise FlowsieveError("the chat template altered the message; cannot locate the context")
    else:
        text, c0 = user, 0
    c1 = c0 + len(ctx)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not chat)
    ids = list(enc["input_ids"])
    offs = enc["offset_mapping"]
    starts = [a for a, _ in offs]
    ends = [b for _, b in offs]
    # context tokens: those that end inside the context; the token crossing its end goes after it
    t0 = next((i for i, e in enumerate(ends) if e > c0), len(ids))
    t1 = next((i for i, e in enumerate(ends) if e > c1), len(ids))
    qspan = None
    if question:
        q0 = c1 + 2  # after the blank line
        qs = next((i for i, s in enumerate(starts) if s >= q0), len(ids))
        qspan = (min(qs, len(ids)), len(ids))
    return Prompt(
        ids=tuple(ids), context=(t0, t1), question=qspan, split=t1, sentences=sentence_index(text, starts)
    )


@dataclass
class GenResult:
    """What one generation produced and cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    kept_tokens: int
    kv_bytes: int
    kv_bytes_full: int
    prefill_s: float
    decode_tok_s: float
    peak_rss_mb: float
    new_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _PeakRSS:
    """Samples this process's RSS in a background thread; ``peak_mb`` after ``stop``."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak / 2**20


def kv_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of a transformers cache."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def stored_tokens(cache: Any) -> int:
    """Entries stored per layer (the largest over layers)."""
    n = 0
    for layer in getattr(cache, "layers", []):
        t = getattr(layer, "keys", None)
        if isinstance(t, torch.Tensor) and t.dim() == 4:
            n = max(n, t.shape[-2])
    return n


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.inference_mode()
def decode_greedy(
    model: nn.Module,
    cache: Any,
    first_logits: torch.Tensor,
    max_new_tokens: int,
    eos: set[int],
    step: Any = None,
) -> tuple[list[int], float]:
    """Greedy decoding from the logits of the last prompt position; returns (tokens, seconds).

    ``step``, if given, is a context manager factory wrapped around every forward pass and then
    called after it (the decode site observes the step and evicts): ``with step() as s: ...; s()``.
    """
    out: list[int] = []
    nxt = int(first_logits[0, -1].argmax())
    t0 = time.perf_counter()
    while True:
        out.append(nxt)
        if nxt in eos or len(out) >= max_new_tokens:
            break
        if step is None:
            logits = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True).logits
        else:
            with step() as after:
                logits = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True).logits
            after()
        nxt = int(logits[0, -1].argmax())
    return out, time.perf_counter() - t0


class DecodeEvictor:
    """Keeps every compressed layer of a :class:`~flowsieve.kvcache.SieveCache` within the sieve's
    capacity during decoding (:meth:`flowsieve.sieve.Sieve.capacity`): after each step, the
    lowest-scored unprotected entries are evicted.

    Protected: the prompt's protected positions (chat template, question, observation window) and
    the ``recent`` most recent entries.
    """

    def __init__(self, model: nn.Module, cache: Any, sieve: Any, protect: torch.Tensor, recent: int) -> None:
        self.model, self.cache, self.sieve = model, cache, sieve
        self.protect, self.recent = protect, recent
        self.capacity = 0
        self.evicted = 0
        self.max_stored = 0

    def __call__(self) -> Any:
        import contextlib

        from flowsieve.observe import observe

        @contextlib.contextmanager
        def ctx() -> Any:
            with observe(self.model, self.sieve.scorer.decode_spec()) as obs:
                yield lambda: self._evict(obs)

        return ctx()

    def _evict(self, obs: Any) -> None:
        from flowsieve.sieve import head_counts, select_topk
        from flowsieve.sieves import ScoreContext

        n_heads, n_kv = head_counts(self.model)
        scorer = self.sieve.scorer
        for i in self.cache.sieve_layers:
            layer = self.cache.layer(i)
            S = layer.stored_length
            self.max_stored = max(self.max_stored, S)
            self.capacity = cap = self.sieve.capacity(layer.cumulative_length)
            ctx = ScoreContext(S, (), n_heads, n_kv, i, len(self.cache.layers), self.sieve.seed)
            if scorer.carries:
                scorer.decode_step(obs.layer(i), layer, ctx)
            if S <= cap:
                continue
            pos = layer.positions
            n = layer.cumulative_length
            prot = (pos >= n - self.recent) | self.protect[pos.clamp(max=self.protect.shape[0] - 1)] & (
                pos < self.protect.shape[0]
            )
            must = int(prot.sum(-1).max())
            if must > cap:
                raise FlowsieveError(
                    f"the decode cache holds at most {cap} entries, fewer than the {must} it must keep "
                    f"(the prompt's protected tokens and the last {self.recent}); raise the budget or keep"
                )
            ctx.candidates = ~prot
            scores = scorer.decode_score(obs.layer(i), layer, ctx).float()
            layer.keep(select_topk(scores, prot, cap))
            self.evicted += S - cap


def full_kv_bytes(model: nn.Module, n_tokens: int, dtype_bytes: int = 4) -> int:
    """Bytes an uncompressed cache of ``n_tokens`` would hold (sliding-window layers capped)."""
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    total = 0
    for t in types:
        n = min(n_tokens, window) if t == "sliding_attention" and window else n_tokens
        total += 2 * n * n_kv * head_dim * dtype_bytes
    return total


def generate(
    model: nn.Module,
    tokenizer: Any,
    context: str,
    question: str | None = None,
    *,
    sieve: Any = None,
    mode: str = "query_aware",
    chat: bool = True,
    max_new_tokens: int = 32,
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> GenResult:
    """Greedy generation with measurements, with or without a sieve.

    Args:
        sieve: a :class:`flowsieve.sieve.Sieve` at the ``prefill``, ``decode``, ``select`` or ``layer``
            site, or None for the full context. At the ``select`` site nothing is evicted (``kv_bytes`` and
            ``kept_tokens`` are the full cache's) and ``extra["attended_entries"]`` is the mean
            number of entries a full-attention layer attended to per decode step. At the ``layer``
            site context tokens leave the residual stream inside the model during prefill
            (:mod:`flowsieve.layer_site`); ``kept_tokens`` is the stream after the last prune layer
            and ``extra["stages"]`` gives, per prune layer, the context tokens kept and the tokens left.
        mode: ``"query_aware"`` compresses with the question in the prompt (the observation window
            covers it); ``"query_agnostic"`` compresses the context first and appends the question
            afterwards, as a cache compressed once would serve questions asked later.
    """
    prompt = _checked_prompt(model, tokenizer, context, question, chat, instruction, mode, max_new_tokens)
    rss = _PeakRSS()
    t0 = time.perf_counter()
    if sieve is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            logits = model(
                input_ids=torch.tensor([prompt.ids]), cache=cache, use_cache=True, logits_to_keep=1
            ).logits
        kv = kv_bytes(cache)
        kept = stored_tokens(cache)
        extra: dict[str, Any] = {}
    else:
        cache, logits, extra = prefill_with_sieve(model, prompt, sieve, mode, tokenizer, chat)
        kv = kv_bytes(cache)
        kept = extra["kept_entries"]
        if sieve.site == "prefill":
            extra.pop("protect_mask")
    prefill_s = time.perf_counter() - t0
    step = None
    if sieve is not None and sieve.site == "decode":
        protect = extra.pop("protect_mask")
        evictor = DecodeEvictor(model, cache, sieve, protect, sieve.window)
        step = evictor
    runtime = extra.pop("select_runtime", None)  # select site: keep selecting while decoding
    # layer site: the pruned cache's layers hold different tokens; decode with per-layer masks
    layer_runtime = extra.pop("layer_runtime", None)
    with runtime.active() if runtime is not None else contextlib.nullcontext():
        with layer_runtime.active() if layer_runtime is not None else contextlib.nullcontext():
            eos = _eos_ids(model, tokenizer)
            new, dec_s = decode_greedy(model, cache, logits, max_new_tokens, eos, step)
    if runtime is not None:
        extra.update(runtime.summary())
    if step is not None:
        extra.update(
            {"evicted": evictor.evicted, "max_stored": evictor.max_stored, "capacity": evictor.capacity}
        )
        kv = max(kv, kv_bytes(cache))
    peak = rss.stop()
    steps = len(new) - 1  # forward passes after prefill
    return GenResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        token_ids=new,
        prompt_tokens=len(prompt),
        kept_tokens=kept,
        kv_bytes=kv,
        kv_bytes_full=full_kv_bytes(model, len(prompt), _dtype_bytes(model)),
        prefill_s=prefill_s,
        decode_tok_s=steps / dec_s if steps > 0 and dec_s > 0 else 0.0,
        peak_rss_mb=peak,
        new_tokens=len(new),
        extra=extra,
    )


def _checked_prompt(
    model: nn.Module,
    tokenizer: Any,
    context: str,
    question: str | None,
    chat: bool,
    instruction: str | None,
    mode: str,
    max_new_tokens: int,
) -> Prompt:
    """The prompt of a generation, after checking its settings and that it fits the model's context."""
    if max_new_tokens < 1:
        raise FlowsieveError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if mode not in ("query_aware", "query_agnostic"):
        raise FlowsieveError(f"mode must be 'query_aware' or 'query_agnostic', got '{mode}'")
    prompt = build_prompt(tokenizer, context, question, chat=chat, instruction=instruction)
    limit = context_length(model)
    if limit is not None and len(prompt) + max_new_tokens > limit:
        raise FlowsieveError(
            f"the prompt is {len(prompt)} tokens (+{max_new_tokens} new), longer than the model's context of {limit}"
        )
    return prompt


@torch.inference_mode()
def append_tokens(model: nn.Module, cache: Any, ids: list[int]) -> torch.Tensor:
    """Feed ``ids`` (e.g. the question after a query-agnostic compression) on top of a compressed
    :class:`~flowsieve.kvcache.SieveCache`; returns the last position's logits (1, 1, V).

    When its layers hold different numbers of entries (a per-layer schedule) the mask of a
    multi-token chunk cannot be shared, so the tokens go one at a time (single tokens need none)."""
    if len({cache.layer(i).stored_length for i in cache.sieve_layers}) > 1:
        for t in ids:
            logits = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True).logits
        return logits[:, -1:]
    return model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1).logits


def _dtype_bytes(model: nn.Module) -> int:
    return next(model.parameters()).element_size()


def units_for(sieve: Any, prompt: Prompt) -> torch.Tensor | None:
    """The unit map ``sieve.compress`` needs for ``prompt``: its sentence map when the sieve keeps
    whole sentences, else None."""
    return prompt.sentence_units() if getattr(sieve, "units", "token") != "token" else None


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _turn_end(tokenizer: Any) -> list[int]:
    """Token ids a chat template puts between a user message and the assistant's reply."""
    mark = "\u2063flowsieve-mark\u2063"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True
    )
    return _encode_plain(tokenizer, text[text.index(mark) + len(mark) :])


def _snapshot_others(cache: Any) -> dict[int, Any]:
    """Copies of the layers that cannot evict (sliding windows), to restore after a crop."""
    from flowsieve.kvcache import _clone_layer

    return {i: _clone_layer(layer) for i, layer in enumerate(cache.layers) if i not in cache.sieve_layers}


def _rewind(cache: Any, n: int, others: dict[int, Any]) -> None:
    """Forget the last ``n`` tokens: crop them from the evictable layers (they must still be stored)
    and put back copies of the other layers saved before them (:func:`_snapshot_others`)."""
    from flowsieve.kvcache import _clone_layer

    for i in cache.sieve_layers:
        cache.layer(i).crop(-n)
    for i, layer in others.items():
        cache.layers[i] = _clone_layer(layer)


@torch.inference_mode()
def replay_observe(
    model: nn.Module,
    tokenizer: Any,
    cache: Any,
    head: Sequence[int],
    context: tuple[int, int],
    sieve: Any,
    chat: bool,
) -> Any:
    """Observe passes that replay the context on top of a prefilled cache (methods with
    ``replays = True``, e.g. KVzip), then remove every replay entry again.

    Each pass feeds a request to repeat the context, the end of the user turn when the prompt is a
    chat whose turn is still open, and the next ``chunk_size`` context tokens, teacher-forced. The
    evictable layers are cropped back after each pass; the other layers (sliding windows) are
    restored from a copy. Returns the :class:`~flowsieve.observe.Observer` (slot coordinates).

    Args:
        head: the prefilled token ids (T,); context: its context span [c0, c1).
    """
    from flowsieve.observe import observe
    from flowsieve.sieves.kvzip import FIRST_REQUEST, NEXT_REQUEST

    if tokenizer is None:
        raise FlowsieveError(f"method '{sieve.method}' replays the context and needs the tokenizer")
    scorer = sieve.scorer
    layers = cache.sieve_layers
    saved = _snapshot_others(cache)
    end = _turn_end(tokenizer) if chat else []
    if end and list(head[-len(end) :]) == end:
        end = []  # the assistant turn is already open (query-aware prompt)
    first, nxt = _encode_plain(tokenizer, FIRST_REQUEST), _encode_plain(tokenizer, NEXT_REQUEST)
    c0, c1 = context
    spec = scorer.replay_spec()
    spec.slots = True
    spec.layers = tuple(layers)
    size = getattr(scorer, "chunk_size", c1 - c0) or (c1 - c0)
    overlap = getattr(scorer, "overlap", 0)
    with observe(model, spec) as obs:
        for a in range(c0, c1, size):
            b = min(a + size, c1)
            req = first if a == c0 else nxt + list(head[max(c0, a - overlap) : a])
            ids = req + end + list(head[a:b])
            model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
            _rewind(cache, len(ids), saved)
    return obs


@torch.inference_mode()
def prefill_with_sieve(
    model: nn.Module, prompt: Prompt, sieve: Any, mode: str, tokenizer: Any = None, chat: bool = True
) -> tuple[Any, torch.Tensor, dict]:
    """Prefill ``prompt`` into a :class:`~flowsieve.kvcache.SieveCache`, compressing it with ``sieve``.

    ``tokenizer`` and ``chat`` (whether ``prompt`` uses the chat template) are needed by methods
    that replay the context (KVzip, :func:`replay_observe`) and ignored otherwise.

    Returns (cache, logits of the last prompt position (1, 1, V), extra measurements).
    """
    from flowsieve.kvcache import SieveCache
    from flowsieve.observe import observe

    if sieve.site == "select":
        # nothing is evicted: the select runtime attends to a subset at every later step
        from flowsieve.select import prefill_select

        return prefill_select(model, prompt, sieve, mode)
    if sieve.site == "layer":
        # context tokens leave the residual stream inside the model (extra["stages"]: kept per stage)
        from flowsieve.layer_site import prefill_layer_site

        return prefill_layer_site(model, prompt, sieve, mode)
    if sieve.site not in ("prefill", "decode"):
        raise FlowsieveError(
            f"generate() runs sieves at the prefill, decode, select and layer sites, not '{sieve.site}'"
        )
    ids = list(prompt.ids)
    if mode == "query_agnostic":
        head = ids[: prompt.split]
        tail = ids[prompt.split :]
    else:
        head, tail = ids, []
    T = len(head)
    c0, c1 = prompt.context
    question = prompt.question if mode == "query_aware" else None
    rows = sieve.observation_rows(T, question)
    protect = protect_mask(prompt, T, rows)
    w = min(sieve.window, T)
    cache = SieveCache(model)
    k = sieve.target(T)
    size = sieve.chunk or T
    units = units_for(sieve, prompt)
    t0 = time.perf_counter()
    score_s = 0.0
    peak_entries = 0
    kept = T
    replay = getattr(sieve.scorer, "replays", False)
    if replay and sieve.site != "prefill":
        raise FlowsieveError(f"method '{sieve.method}' runs at the prefill site only")
    if getattr(sieve, "refeed", False):
        if mode != "query_aware" or prompt.question is None or prompt.split >= T:
            raise FlowsieveError("refeed needs a question, in query-aware mode")
        if replay:
            raise FlowsieveError(f"method '{sieve.method}' replays the context; it does not refeed")
        return _prefill_refeed(model, prompt, sieve, protect, rows, k, units)
    for a in range(0, T, size):
        b = min(a + size, T)
        win = sieve.observation_rows(b, question, a) if b == T else tuple(range(max(0, b - w), b))
        with observe(model, sieve.observe_spec(win, cache.sieve_layers)) as obs:
            logits = model(
                input_ids=torch.tensor([head[a:b]]), cache=cache, use_cache=True, logits_to_keep=1
            ).logits
        peak_entries = max(peak_entries, max(cache.stored_lengths()))
        if b == T or sieve.scorer.carries or max(cache.stored_lengths()) > k:
            # the window of every chunk is kept at that step; at the end only the final window
            prot = protect[:b].clone()
            prot[win[0] : b] = True
            ts = time.perf_counter()
            if replay:
                obs = replay_observe(model, tokenizer, cache, head, (c0, min(c1, T)), sieve, chat)
            kept = sieve.compress(obs, cache, prot, win, k=min(k, b), units=units)
            score_s += time.perf_counter() - ts
    t1 = time.perf_counter()
    if tail:
        logits = append_tokens(model, cache, tail)
    extra = {
        "kept_entries": kept + len(tail),
        "compressed_tokens": T,
        "protected": int(protect.sum()),
        "prefill_forward_s": round(t1 - t0 - score_s, 4),
        "score_s": round(score_s, 4),
        "peak_entries": peak_entries,
        "chunk": sieve.chunk,
        "protect_mask": torch.cat([protect, torch.ones(len(tail), dtype=torch.bool)]),
    }
    return cache, logits, extra


def protect_mask(prompt: Prompt, n_tokens: int, rows: Sequence[int]) -> torch.Tensor:
    """bool (n_tokens,): the entries a compression of the first ``n_tokens`` prompt tokens always
    keeps: everything outside the context (chat template, question) and the observation ``rows``."""
    c0, c1 = prompt.context
    protect = torch.ones(n_tokens, dtype=torch.bool)
    protect[c0 : min(c1, n_tokens)] = False
    protect[list(rows)] = True
    return protect


def _requery(model: nn.Module, cache: Any, question: list[int], others: dict[int, Any]) -> torch.Tensor:
    """Drop the question's entries from a compressed cache (they are protected, so still the last
    ones stored), restore the non-evicting layers to their state before the question, and feed the
    question again; returns its last logits (1, 1, V)."""
    _rewind(cache, len(question), others)
    return append_tokens(model, cache, question)


def _prefill_refeed(
    model: nn.Module,
    prompt: Prompt,
    sieve: Any,
    protect: torch.Tensor,
    win: tuple[int, ...],
    k: int,
    units: Any,
) -> tuple[Any, torch.Tensor, dict]:
    """Query-aware prefill with ``sieve.refeed``: context, then question, observed as one prefill
    (observation rows ``win``); compress; then the question again over the compressed cache
    (:func:`_requery`)."""
    from flowsieve.kvcache import SieveCache
    from flowsieve.observe import observe

    ids = list(prompt.ids)
    T, s = len(ids), prompt.split
    cache = SieveCache(model)
    t0 = time.perf_counter()
    with observe(model, sieve.observe_spec(win, cache.sieve_layers)) as obs:
        model(input_ids=torch.tensor([ids[:s]]), cache=cache, use_cache=True, logits_to_keep=1)
        others = _snapshot_others(cache)
        model(input_ids=torch.tensor([ids[s:]]), cache=cache, use_cache=True, logits_to_keep=1)
    obs.pad_rows(T)
    peak_entries = max(cache.stored_lengths())
    ts = time.perf_counter()
    kept = sieve.compress(obs, cache, protect, win, k=k, units=units)
    score_s = time.perf_counter() - ts
    logits = _requery(model, cache, ids[s:], others)
    extra = {
        "kept_entries": kept,
        "compressed_tokens": T,
        "protected": int(protect.sum()),
        "prefill_forward_s": round(time.perf_counter() - t0 - score_s, 4),
        "score_s": round(score_s, 4),
        "peak_entries": peak_entries,
        "chunk": None,
        "refeed_tokens": T - s,
        "protect_mask": protect,
    }
    return cache, logits, extra


def merge_specs(specs: Sequence[Any]) -> Any:
    """One :class:`~flowsieve.observe.ObserveSpec` that records everything each of ``specs`` asks for.

    Flags are or-ed, rows and layers united; the sampling settings (``row_stride``,
    ``entropy_stride``, ``workers``, ``chunk``) must agree, since they change the recorded values.
    """
    if not specs:
        raise FlowsieveError("no observation specs to merge")
    first = specs[0]
    out: dict[str, Any] = {}
    for f in fields(first):
        vals = [getattr(s, f.name) for s in specs]
        if f.name == "rows":
            out[f.name] = tuple(sorted(set().union(*map(set, vals))))
        elif f.name == "layers":
            out[f.name] = (
                None if any(v is None for v in vals) else tuple(sorted(set().union(*map(set, vals))))
            )
        elif isinstance(vals[0], bool):
            out[f.name] = any(vals)
        elif len(set(vals)) > 1:
            raise FlowsieveError(
                f"the sieves observe with different {f.name} settings ({vals}); run them separately"
            )
        else:
            out[f.name] = vals[0]
    return replace(first, **out)


def generate_many(
    model: nn.Module,
    tokenizer: Any,
    context: str,
    question: str | None,
    sieves: Sequence[Any],
    *,
    mode: str = "query_aware",
    chat: bool = True,
    max_new_tokens: int = 32,
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> list[GenResult]:
    """:func:`generate` for several prefill-site sieves on one prompt, sharing one observed prefill.

    The prompt is prefilled once while recording everything the sieves need
    (:func:`merge_specs`); then each sieve compresses its own copy of the cache, the question
    follows (query-agnostic mode) and greedy decoding runs. Each result is what ``generate`` with
    that sieve returns (kept entries, KV bytes, tokens), except for measurement noise and float
    ties: the shared pass computes attention the way the most demanding sieve needs it (exact
    chunked scan or stock SDPA), which agree to ~1e-6. Its ``prefill_s`` is the shared forward
    pass plus this sieve's own scoring, compression and question tail; ``extra["shared_prefill"]``
    says so, and ``extra["shared_forward_s"]`` gives the shared part. Speed comparisons between
    methods need :func:`generate`, one method per pass.

    Sieves whose observation rows differ (e.g. Keyformer over all rows) get their own pass.
    Only the ``prefill`` site without chunking is shared; other sieves raise :class:`FlowsieveError`.
    """
    from flowsieve.kvcache import SieveCache
    from flowsieve.observe import observe

    for s in sieves:
        if s.site != "prefill" or s.chunk is not None:
            raise FlowsieveError("generate_many shares unchunked prefill-site passes only; use generate()")
        if getattr(s.scorer, "replays", False):
            raise FlowsieveError(f"method '{s.method}' scores from its own replay passes; use generate()")
    prompt = _checked_prompt(model, tokenizer, context, question, chat, instruction, mode, max_new_tokens)
    ids = list(prompt.ids)
    head, tail = (ids[: prompt.split], ids[prompt.split :]) if mode == "query_agnostic" else (ids, [])
    T = len(head)
    results: list[GenResult | None] = [None] * len(sieves)
    groups: dict[tuple[int, ...], list[int]] = {}
    if not sieves:
        return []
    question = prompt.question if mode == "query_aware" else None
    wins = [s.observation_rows(T, question) for s in sieves]
    protects = [protect_mask(prompt, T, w) for w in wins]
    layers = SieveCache(model).sieve_layers
    rowless = []
    for j, s in enumerate(sieves):
        rows = tuple(s.observe_spec(wins[j], layers).rows)
        if rows:
            groups.setdefault(rows, []).append(j)
        else:
            rowless.append(j)  # reads no rows: may share any pass
    if rowless and groups:
        next(iter(groups.values())).extend(rowless)
    elif rowless:
        groups[()] = rowless
    eos = _eos_ids(model, tokenizer)
    full_bytes = full_kv_bytes(model, len(prompt), _dtype_bytes(model))
    for members in groups.values():
        spec = merge_specs([sieves[j].observe_spec(wins[j], layers) for j in members])
        base = SieveCache(model)
        t0 = time.perf_counter()
        refeed = any(getattr(sieves[j], "refeed", False) for j in members)
        if refeed and (mode != "query_aware" or prompt.question is None or prompt.split >= T):
            raise FlowsieveError("refeed needs a question, in query-aware mode")
        others: dict[int, Any] = {}
        with torch.inference_mode(), observe(model, spec) as obs:
            if refeed:  # context, then question: the non-evicting layers are saved in between
                model(
                    input_ids=torch.tensor([head[: prompt.split]]),
                    cache=base,
                    use_cache=True,
                    logits_to_keep=1,
                )
                others = _snapshot_others(base)
                logits0 = model(
                    input_ids=torch.tensor([head[prompt.split :]]),
                    cache=base,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits
                obs.pad_rows(T)
            else:
                logits0 = model(
                    input_ids=torch.tensor([head]), cache=base, use_cache=True, logits_to_keep=1
                ).logits
        shared_s = time.perf_counter() - t0
        for j in members:
            sieve = sieves[j]
            rss = _PeakRSS()
            t1 = time.perf_counter()
            cache = base.clone()
            with torch.inference_mode():
                units = units_for(sieve, prompt)
                kept = sieve.compress(obs, cache, protects[j], wins[j], k=sieve.target(T), units=units)
                logits = append_tokens(model, cache, tail) if tail else logits0
                if getattr(sieve, "refeed", False):
                    logits = _requery(model, cache, head[prompt.split :], others)
            own_s = time.perf_counter() - t1
            kv = kv_bytes(cache)
            new, dec_s = decode_greedy(model, cache, logits, max_new_tokens, eos)
            peak = rss.stop()
            steps = len(new) - 1
            results[j] = GenResult(
                text=tokenizer.decode(new, skip_special_tokens=True),
                token_ids=new,
                prompt_tokens=len(prompt),
                kept_tokens=kept + len(tail),
                kv_bytes=kv,
                kv_bytes_full=full_bytes,
                prefill_s=shared_s + own_s,
                decode_tok_s=steps / dec_s if steps > 0 and dec_s > 0 else 0.0,
                peak_rss_mb=peak,
                new_tokens=len(new),
                extra={
                    "kept_entries": kept + len(tail),
                    "compressed_tokens": T,
                    "protected": int(protects[j].sum()),
                    "shared_prefill": True,
                    "shared_forward_s": round(shared_s, 4),
                    "own_s": round(own_s, 4),
                },
            )
            del cache
        del obs, base
    return [r for r in results if r is not None]

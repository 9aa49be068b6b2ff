"""``Sieve``: a method + a site + a budget — the one object users and the bench hand around.

At the ``prefill`` site a sieve observes the prefill forward pass (only what its scorer needs),
scores every cache entry per layer, keeps the protected entries (everything outside the
compressible context, e.g. the chat template and the question, plus the observation window) and
the best-scored context entries up to the budget, and physically shrinks the cache
(:class:`flowsieve.kvcache.SieveLayer.keep`): ``kv_bytes`` drops to about ``keep`` of the full
cache. Kept keys keep their original positions; later tokens get absolute positions.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flowsieve.errors import FlowsieveError, did_you_mean
from flowsieve.inputs import DEFAULT_INSTRUCTION, checked_prompt
from flowsieve.kvcache import SieveCache, plain_cache
from flowsieve.methods import METHODS, KVScorer, ScoreContext
from flowsieve.methods.base import unit_pool
from flowsieve.methods.selection import select_topk
from flowsieve.models import eos_ids, head_counts
from flowsieve.observe import Observer, ObserveSpec, observe
from flowsieve.sites import SITES as CACHE_SITES
from flowsieve.sites import TEXT_SITES, get_site, prefill_cache

SITES = (*CACHE_SITES, *TEXT_SITES)
UNITS = ("token", "sentence")
ROWS = ("question", "window")
DEFAULT = "default"
# What ``method="default"`` means in each mode: the flowsieve candidate of highest aggregate
# (:mod:`flowsieve.bench.choose`) on the headline suite (unseen seeds and haystacks, both bundled
# models; README "Results"). Sieve fields other than these come from the sieve itself.
DEFAULTS: dict[str, dict[str, Any]] = {
    "query_aware": {"method": "fusion", "units": "sentence"},
    "query_agnostic": {"method": "selfinfo", "units": "sentence"},
}
DEFAULT_WHY = "highest mean share of the full context's results kept on the headline suite"
# model.generate arguments that Sieve.generate sets itself or cannot honour
_OWNED_GENERATE_KWARGS = frozenset(
    (
        *("inputs", "input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache_position"),
        *("cache", "past_key_values", "use_cache", "prefill_chunk_size"),
        *("output_attentions", "output_hidden_states"),
    )
)


@dataclass
class Sieve:
    """A compression method at a site under a budget.

    Attributes:
        method: a registered method name (``flowsieve ls`` lists them).
        keep: share of the prompt's KV entries to keep, in (0, 1]; or give ``budget``.
        budget: number of entries to keep per layer (protected ones included).
        site: where the method is applied.
        window: observation window of query-agnostic compression (the last ``window`` tokens of
            the compressed part, whose attention scores the rest; always kept), of every chunk but
            the last of a chunked prefill, and of query-aware compression with ``rows="window"``.
        rows: which queries observe a query-aware compression: ``"question"`` (default) the question
            span, i.e. every token after the context (question, instruction, chat template up to
            the answer), whatever its length; ``"window"`` the last ``window`` prompt tokens
            (SnapKV's placement: a short question leaves context tokens in the window, and those
            are then kept; a long one is cut).
        chunk: prefill in chunks of this many tokens and compress after each chunk, so that the
            cache never holds more than budget + chunk entries (None = one pass). Each compression
            scores from the observations of its own chunk (a method summing attention over all
            queries, like h2o, then sums over the chunk's queries).
        seed: for methods that draw random numbers.
        options: keyword arguments of the method (e.g. ``{"kernel": 7}`` for snapkv).
        units: ``"token"`` (default: entries are kept one by one, the papers' rule) or
            ``"sentence"``: at the prefill site the method's scores rank whole sentences by their
            best entry and the best sentences are kept whole (the last one in part, so the budget
            stays exact); needs the prompt's sentence map, which :func:`flowsieve.generate.generate`
            and :func:`~flowsieve.generate.generate_many` provide. A project extension (whole-segment
            selection as in LongLLMLingua's coarse stage), not part of any KV paper.
        refeed: query-aware prefill only: score with the question in the prompt as usual, then drop
            the question's own entries and feed it again on top of the compressed cache, so that the
            question's keys and values are computed over the context the answer will see (instead of
            over the full context). Costs one more forward of the question tokens. A project
            extension, off by default (the papers keep the question's prefill entries).
    """

    method: str = DEFAULT
    keep: float | None = None
    budget: int | None = None
    site: str = "prefill"
    window: int = 32
    chunk: int | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    units: str = "token"
    refeed: bool = False
    rows: str = "question"

    def __post_init__(self) -> None:
        if self.method == DEFAULT:
            self._check_default()
            return
        cls = METHODS.get(self.method)
        if self.units not in UNITS:
            raise FlowsieveError(
                f"unknown units '{self.units}'{did_you_mean(self.units, UNITS)}; known: {', '.join(UNITS)}"
            )
        if self.rows not in ROWS:
            raise FlowsieveError(
                f"unknown rows '{self.rows}'{did_you_mean(self.rows, ROWS)}; known: {', '.join(ROWS)}"
            )
        if self.refeed and (self.site != "prefill" or self.chunk is not None):
            raise FlowsieveError("refeed applies to an unchunked prefill-site sieve only")
        if self.units != "token" and self.site != "prefill":
            raise FlowsieveError(f"units='{self.units}' applies at the prefill site only, not '{self.site}'")
        if (self.keep is None) == (self.budget is None):
            raise FlowsieveError("give exactly one of keep (a ratio) and budget (a token count)")
        if self.keep is not None and not (0 < self.keep <= 1):
            raise FlowsieveError(f"keep must be in (0, 1], got {self.keep}")
        if self.budget is not None and self.budget < 1:
            raise FlowsieveError(f"budget must be >= 1, got {self.budget}")
        if self.site not in SITES:
            raise FlowsieveError(
                f"unknown site '{self.site}'{did_you_mean(self.site, SITES)}; known: {', '.join(SITES)}"
            )
        if self.site not in cls.sites:
            raise FlowsieveError(
                f"method '{self.method}' does not support site '{self.site}' (it supports: {', '.join(cls.sites)})"
            )
        if self.window < 1:
            raise FlowsieveError(f"window must be >= 1, got {self.window}")
        if self.chunk is not None and self.chunk < self.window:
            raise FlowsieveError(f"chunk ({self.chunk}) must be at least the window ({self.window})")
        if self.chunk is not None and not cls.chunkable:
            raise FlowsieveError(
                f"method '{self.method}' scores the whole prompt at once; it has no chunked prefill"
            )
        if self.chunk is not None and getattr(cls, "per_layer_budgets", False):
            raise FlowsieveError(
                f"method '{self.method}' gives layers different budgets; chunked prefill needs equal ones"
            )
        try:
            self.scorer: KVScorer = cls(**self.options)
        except TypeError as e:
            raise FlowsieveError(f"bad option for method '{self.method}': {e}") from None
        if self.site in CACHE_SITES:
            get_site(self.site).check(self)

    def _check_default(self) -> None:
        """``method="default"`` picks method, units and refeed per mode (:data:`DEFAULTS`); every
        mode's pick must accept this sieve's other settings."""
        if self.options or self.units != "token" or self.refeed:
            raise FlowsieveError(
                "method 'default' chooses its own options, units and refeed: name a method to set them"
            )
        for mode in DEFAULTS:
            try:
                self.resolve(mode)
            except FlowsieveError as e:
                raise FlowsieveError(f"the default sieve ({describe_default(mode)}): {e}") from None

    def resolve(self, mode: str) -> Sieve:
        """This sieve with ``method="default"`` replaced by the default of ``mode`` (itself when it
        names a method). Every entry point (sites, ``generate``, ``Sieve.on``) resolves first."""
        if self.method != DEFAULT:
            return self
        if mode not in DEFAULTS:
            raise FlowsieveError(
                f"unknown mode '{mode}'{did_you_mean(mode, DEFAULTS)}; known: {', '.join(DEFAULTS)}"
            )
        return dataclasses.replace(self, **DEFAULTS[mode])

    def target(self, n_tokens: int) -> int:
        """Entries to keep per layer for a prompt of ``n_tokens``."""
        if self.budget is not None:
            if self.site == "decode":
                return min(self.budget, n_tokens)  # the decode cache may fill up to its budget
            if self.budget > n_tokens:
                raise FlowsieveError(f"budget {self.budget} is larger than the prompt ({n_tokens} tokens)")
            return self.budget
        assert self.keep is not None
        return max(1, round(self.keep * n_tokens))

    def capacity(self, seen_tokens: int) -> int:
        """Entries a ``decode``-site cache holds at most after ``seen_tokens`` tokens: the budget
        (a fixed size, for endless streams), or keep x the tokens seen so far (keep = 1 never evicts).
        At the ``select`` site: the entries an attention call attends to when ``seen_tokens`` are
        cached (keep = 1 attends to all)."""
        if self.budget is not None:
            return self.budget
        assert self.keep is not None
        return max(1, round(self.keep * seen_tokens))

    def observation_rows(
        self, n_tokens: int, question: tuple[int, int] | None = None, start: int = 0
    ) -> tuple[int, ...]:
        """Absolute positions of the queries that observe a compression of the first ``n_tokens``
        prompt tokens, of which the current pass fed ``[start, n_tokens)``.

        With ``rows="question"`` and a question span ``question = (q0, q1)`` that reaches the end
        (query-aware mode): ``[max(q0, start), n_tokens)``, the question and what follows it. Otherwise
        the last ``window`` tokens (query-agnostic mode, earlier chunks, ``rows="window"``)."""
        if self.rows == "question" and question is not None and question[0] < n_tokens <= question[1]:
            first = max(question[0], start)
            if first < n_tokens:
                return tuple(range(first, n_tokens))
        w = min(self.window, n_tokens)
        return tuple(range(n_tokens - w, n_tokens))

    def observe_spec(self, window: tuple[int, ...], layers: Sequence[int] | None = None) -> ObserveSpec:
        """What to observe for a compression scored at ``window``; ``layers``: only these layers
        (the cache's compressible ones: sliding-window layers are never scored, so observing them
        would be wasted work)."""
        spec = self.scorer.spec(window)
        spec.slots = True  # the cache may already be compressed: index keys by slot
        if layers is not None:
            spec.layers = tuple(layers)
        return spec

    def compress(
        self,
        obs: Observer,
        cache: Any,
        protect: torch.Tensor,
        window: tuple[int, ...],
        k: int | None = None,
        units: torch.Tensor | None = None,
    ) -> int:
        """Score every sieve layer of ``cache`` from ``obs`` and keep the best entries.

        Args:
            obs: the observer of the pass that just ran (per-key values in cache-slot coordinates).
            cache: a :class:`flowsieve.kvcache.SieveCache`.
            protect: bool (N,) over absolute token positions: entries that are always kept.
            window: absolute positions of the observation queries.
            k: entries to keep per layer (default: ``target`` of the absolute length).
            units: (N,) long over absolute positions, the sentence of every token; required when
                :attr:`units` is ``"sentence"``.

        Returns:
            the mean number of entries kept per sieve layer.
        """
        layers = cache.sieve_layers
        if not layers:
            return 0
        T = int(cache.layer(layers[0]).stored_length)
        if any(int(cache.layer(i).stored_length) != T for i in layers):
            raise FlowsieveError(
                "the compressed layers hold different numbers of entries; cannot compress again"
            )
        k = self.target(protect.shape[0]) if k is None else k
        prot = {i: protect[cache.layer(i).positions] for i in layers}  # (1|B, 1|Hk, T) per layer
        n_protected = max(int(p.sum(-1).max()) for p in prot.values())
        if k < n_protected:
            raise FlowsieveError(
                f"the budget ({k} entries) is smaller than the tokens that must be kept "
                f"({n_protected}: the question, the chat template and the observation window)"
            )
        if k >= T and not self.scorer.carries:
            return T
        n_heads, n_kv = head_counts(obs.model)
        n_layers = len(obs.attn_modules)
        # only the compressed layers are scored (and accumulated across, in order): sliding-window
        # layers hold a different set of keys
        raw = []
        for i in layers:
            ctx = ScoreContext(T, window, n_heads, n_kv, i, n_layers, self.seed, candidates=~prot[i])
            raw.append(self.scorer.score(obs.layer(i), ctx).float())
        scores = {
            i: self.scorer.carry(cache.layer(i), s) for i, s in zip(layers, self.scorer.accumulate(raw))
        }
        if k >= T:
            return T
        if self.units == "sentence":
            if units is None:
                raise FlowsieveError(
                    "units='sentence' needs the prompt's sentence map: run it through flowsieve.generate"
                )
            # whole sentences are ranked for selection; a recycling method still weighs by entry
            ranked = {
                i: unit_pool(scores[i], units[cache.layer(i).positions], self.scorer.unit_reduce)
                for i in layers
            }
        else:
            ranked = scores
        plan = self.scorer.budgets(k, n_protected, T, layers)
        for i in layers:
            ki = plan[i]
            if not n_protected <= ki <= T:
                raise FlowsieveError(f"layer {i}: budget {ki} outside [{n_protected}, {T}]")
            if ki < T:
                idx = select_topk(ranked[i], prot[i], ki)
                merged = self.scorer.recycle(*cache.stored_kv(i), scores[i], idx, prot[i])
                if merged is not None:
                    cache.replace_kv(i, *merged)
                cache.keep(i, idx)
        return round(sum(plan.values()) / len(plan))

    @contextlib.contextmanager
    def on(self, model: Any, site: str | None = None, protect_last: int = 0) -> Iterator[Sieve]:
        """Apply this sieve to every ``model(...)`` / ``model.generate(...)`` call inside the block.

        A prefill call (no cache, or an empty one) gets a :class:`~flowsieve.kvcache.SieveCache`
        that is compressed right after the forward pass; at the ``decode`` site every later step
        is observed and the cache kept within :meth:`capacity`. At the ``select`` site the cache
        is left whole and every later forward pass attends, per full-attention layer, to the
        entries the method picks (:mod:`flowsieve.sites.select`). At the ``layer`` site the prefill pass
        drops context tokens between decoder layers (:mod:`flowsieve.sites.layer`; the last
        ``protect_last`` tokens are not context) and later passes run with the pruned cache's
        per-layer masks. Protected: the last ``protect_last`` tokens (the question and what follows
        it; with ``rows="question"`` they are also the observation rows) and the observation rows
        (the last ``window`` prompt tokens when ``protect_last`` is 0). Batch size 1 only. Hooks are always removed on exit.
        """
        from flowsieve.sites.decode import DecodeEvictor

        if self.method == DEFAULT:  # the question is the last protect_last tokens, if any
            with self.resolve("query_aware" if protect_last else "query_agnostic").on(
                model, site, protect_last
            ) as resolved:
                yield resolved
            return
        site = site or self.site
        if self.units != "token":
            raise FlowsieveError(
                f"units='{self.units}' needs the prompt's sentence map, which Sieve.on never sees: use "
                "sieve.generate(model, tokenizer, context, question, ...) (model.generate on the compressed cache)"
            )
        if self.refeed:
            raise FlowsieveError(
                "refeed feeds the question again after compressing, which Sieve.on cannot do inside one "
                "model(...) call: use sieve.generate(model, tokenizer, context, question, ...)"
            )
        if site not in ("prefill", "decode", "select", "layer"):
            raise FlowsieveError(
                f"Sieve.on supports the prefill, decode, select and layer sites, not '{site}'"
            )
        if getattr(self.scorer, "replays", False):
            raise FlowsieveError(
                f"method '{self.method}' scores by replaying the context, which needs the tokenizer: "
                "use sieve.generate(model, tokenizer, context, ...) or flowsieve.generate.generate, not Sieve.on"
            )
        if site not in self.scorer.sites:
            raise FlowsieveError(
                f"method '{self.method}' does not support site '{site}' (it supports: {', '.join(self.scorer.sites)})"
            )
        if site == "select":
            # every forward pass selects keys (a first pass over an empty cache attends to all)
            from flowsieve.sites.select import SelectRuntime

            with SelectRuntime(model, self).active():
                yield self
            return
        if site == "layer":
            # the prefill pass drops context tokens inside the model; later passes get per-layer masks
            from flowsieve.sites.layer import attach

            with attach(model, self, protect_last):
                yield self
            return
        if self.chunk is not None:
            raise FlowsieveError(
                "chunked prefill runs through sieve.generate(model, tokenizer, context, ...) or "
                "flowsieve.generate.generate, not Sieve.on"
            )
        state: dict[str, Any] = {}

        def pre(mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise FlowsieveError("Sieve.on needs input_ids")
            if ids.shape[0] != 1:
                raise FlowsieveError("sieves run one sequence at a time (batch size 1)")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is None or cache.get_seq_length() == 0:
                T = int(ids.shape[1])
                # the last protect_last tokens are the question span (query-aware rows)
                question = (T - min(protect_last, T), T) if protect_last > 0 else None
                window = self.observation_rows(T, question)
                protect = torch.zeros(T, dtype=torch.bool)
                protect[T - max(len(window), min(protect_last, T)) :] = True
                new = SieveCache(model)
                kwargs.pop("past_key_values", None)
                kwargs["cache"] = new
                kwargs["use_cache"] = True
                cm = observe(model, self.observe_spec(window, new.sieve_layers))
                state.update(
                    cm=cm, obs=cm.__enter__(), phase="prefill", cache=new, protect=protect, window=window
                )
            elif site == "decode" and "evictor" in state and cache is state["cache"]:
                cm = state["evictor"]()
                state.update(cm=cm, after=cm.__enter__(), phase="decode")
            return args, kwargs

        def post(mod: Any, args: tuple, kwargs: dict, output: Any) -> None:
            cm = state.pop("cm", None)
            if cm is None:
                return
            cm.__exit__(None, None, None)
            if state.get("phase") == "prefill":
                self.compress(state.pop("obs"), state["cache"], state["protect"], state["window"])
                if site == "decode":
                    state["evictor"] = DecodeEvictor(
                        model, state["cache"], self, state["protect"], self.window
                    )
            else:
                state.pop("after")()

        h1 = model.register_forward_pre_hook(pre, with_kwargs=True)
        h2 = model.register_forward_hook(post, with_kwargs=True)
        try:
            yield self
        finally:
            h1.remove()
            h2.remove()
            cm = state.pop("cm", None)
            if cm is not None:
                cm.__exit__(None, None, None)

    @torch.inference_mode()
    def generate(
        self,
        model: Any,
        tokenizer: Any,
        context: str,
        question: str | None = None,
        *,
        mode: str = "query_aware",
        chat: bool = True,
        instruction: str | None = DEFAULT_INSTRUCTION,
        max_new_tokens: int = 32,
        **generate_kwargs: Any,
    ) -> list[int]:
        """``model.generate`` on this sieve's compressed cache: the new token ids.

        Builds the prompt of :func:`flowsieve.generate.generate` from ``context`` and ``question``
        (same ``mode``, ``chat`` and ``instruction``), prefills and compresses it with
        :func:`flowsieve.sites.prefill_cache` (so every prefill-site option works: ``units="sentence"``,
        ``refeed``, ``chunk``, replaying methods), then lets ``model.generate`` continue from that
        cache. Greedy decoding (``do_sample=False``) gives token for token what
        ``flowsieve.generate.generate(..., sieve=self).token_ids`` gives; any other setting of
        ``generate`` (sampling, logits processors, stopping criteria, streamers) applies as usual.

        How it is fed: ``model.generate(input_ids=<all prompt ids>, cache=<compressed cache>)``. The
        cache reports every prompt token as seen (``get_seq_length()`` is absolute), so the prompt
        is not fed again; ``generate``'s first forward pass is answered with the prefill's own
        last-position logits (computed, in query-aware mode, before compression, as
        :func:`flowsieve.generate.decode_greedy` uses them): a one-token stand-in pass on a
        throwaway cache gives its output object, whose logits and cache are replaced. Every later
        step feeds one new token at its absolute position on the compressed cache.

        Args:
            model, tokenizer: a causal LM and its tokenizer.
            context: the compressible text; question: asked after it (query-aware mode needs one
                to observe with; ``refeed`` requires it).
            mode: ``"query_aware"`` or ``"query_agnostic"`` (:data:`flowsieve.inputs.MODES`).
            chat: render with the tokenizer's chat template; instruction: appended to the question.
            max_new_tokens: as in ``generate`` (default 32, as :func:`flowsieve.generate.generate`).
            generate_kwargs: passed to ``model.generate``. ``eos_token_id`` defaults to every
                end-of-sequence id of the generation config, config and tokenizer (where
                :func:`flowsieve.generate.generate` stops). Inputs, cache, attention mask and
                position ids are this method's; one sequence only (no beams); no prefill chunking
                by ``generate`` (use :attr:`chunk`); no ``use_cache``, attentions or hidden states
                (the first step is not a real forward pass).

        Returns:
            the new token ids (end-of-sequence included if generated), as ``GenResult.token_ids``;
            ``tokenizer.decode(ids, skip_special_tokens=True)`` is ``GenResult.text``.

        Prefill site only: for the ``decode``, ``select`` and ``layer`` sites use
        ``with sieve.on(model): model.generate(...)``.
        """
        if self.method == DEFAULT:
            return self.resolve(mode).generate(
                model,
                tokenizer,
                context,
                question,
                mode=mode,
                chat=chat,
                instruction=instruction,
                max_new_tokens=max_new_tokens,
                **generate_kwargs,
            )
        if self.site != "prefill":
            raise FlowsieveError(
                f"Sieve.generate runs prefill-site sieves only, not '{self.site}': use "
                "`with sieve.on(model): model.generate(...)` (or flowsieve.generate.generate)"
            )
        bad = sorted(set(generate_kwargs) & _OWNED_GENERATE_KWARGS)
        if bad:
            raise FlowsieveError(f"Sieve.generate sets or cannot honour {', '.join(bad)}; leave them out")
        config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
        if any(
            generate_kwargs.get(k, getattr(config, k, 1) or 1) != 1
            for k in ("num_beams", "num_return_sequences")
        ):
            raise FlowsieveError("Sieve.generate runs one sequence (num_beams=1, num_return_sequences=1)")
        prompt = checked_prompt(model, tokenizer, context, question, chat, instruction, mode, max_new_tokens)
        pre = prefill_cache(model, prompt, self, mode, tokenizer, chat)
        ids = torch.tensor([prompt.ids], device=pre.logits.device)
        generate_kwargs.setdefault("eos_token_id", sorted(eos_ids(model, tokenizer)) or None)
        first = {"pending": True}

        def stand_in(mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            # generate's first pass would feed the prompt again: one token on a throwaway cache instead
            if not first["pending"]:
                return None
            for k in ("input_ids", "position_ids", "attention_mask", "cache_position", "inputs_embeds"):
                kwargs.pop(k, None)
            kwargs.update(input_ids=ids[:, -1:], cache=plain_cache(model), use_cache=True)
            return (), kwargs

        def answer(mod: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            # ... answered with the prefill's logits and the compressed cache
            if not first["pending"]:
                return None
            first["pending"] = False
            output.logits = pre.logits
            output.cache = pre.cache
            return output

        h1 = model.register_forward_pre_hook(stand_in, with_kwargs=True)
        h2 = model.register_forward_hook(answer, with_kwargs=True)
        try:
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                cache=pre.cache,
                max_new_tokens=max_new_tokens,
                prefill_chunk_size=None,
                **generate_kwargs,
            )
        finally:
            h1.remove()
            h2.remove()
        seq = getattr(out, "sequences", out)
        return [int(t) for t in seq[0, ids.shape[1] :]]


def describe_default(mode: str) -> str:
    """The default sieve of ``mode`` in the bench's ``method@opt=value`` spelling."""
    d = dict(DEFAULTS[mode])
    return "@".join([d.pop("method"), *(f"{k}={str(v).lower()}" for k, v in d.items())])


def list_methods() -> list[dict[str, Any]]:
    """name, sites and paper of every registered method: KV and layer methods and prompt scorers
    (site ``prompt``); a name registered in both lists all its sites and both citations."""
    from flowsieve.methods.prompt import SCORERS

    rows = {n: {"name": n, "sites": list(c.sites), "paper": c.paper} for n, c in METHODS.items()}
    for n, c in SCORERS.items():
        if n in rows:
            rows[n]["sites"].append("prompt")
            if c.paper and c.paper.split()[-1] not in rows[n]["paper"]:  # another paper
                rows[n]["paper"] += f"; prompt: {c.paper}"
        else:
            rows[n] = {"name": n, "sites": ["prompt"], "paper": c.paper}
    return [rows[n] for n in sorted(rows)]

"""The observation seam: the one module that touches transformers internals for observation.

An attention function registered with transformers' ``AttentionInterface`` (and its mask with
``AttentionMaskInterface``, without which a multi-token chunk on top of a cache is silently computed
with the wrong causal alignment) produces the model's attention output and, while an :class:`Observer`
is active, records per layer what scorers ask for:

- attention rows of chosen query positions (last token, a window, the question span, CLS);
- attention received by every key, summed over all queries, computed query chunk by query chunk
  so that no ``T x T`` matrix is ever held (H2O's accumulated attention), or its maximum over
  queries (KVzip's reconstruction score);
- per-head statistics: mass on the first token, normalised row entropy, output norm (for sink and
  dormant-head detection);
- key and value norms, and the value-value "semantic" rows FlowCut needs;
- hidden-state transitions of the attention and MLP blocks (TransPrune's TTV), through forward hooks;
- the surprisal of every token, -log p(token | prefix), from the model's own output head applied to
  the final hidden states (self-information, as LLMLingua and Selective Context score text).

The same function is also the seam of the ``select`` site: inside :func:`select_keys` it asks a
key selector, per layer and per call, which cached entries the call's queries attend to, gathers
only those keys and values and runs SDPA on them (the unselected entries cost nothing in the
attention itself; they stay in the cache).

Shapes: B batch, H query heads, Hk key/value heads, g = H / Hk, q new tokens, L keys (cache + new).

When a signal that needs every query row is requested (``received``, ``received_max`` or
``head_stats``), the output
is computed in the same chunked pass from the same probabilities (``softmax(q k^T) v``, fp32
softmax), so the attention is not computed twice; it matches stock SDPA to float tolerance
(tested to 1e-5). Otherwise the stock SDPA function produces the output.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError

ATTN_NAME = "flowsieve"
_ACTIVE: contextvars.ContextVar[Observer | None] = contextvars.ContextVar("flowsieve_observer", default=None)
# (ids of the attention modules it applies to, selector) while a select_keys block is active
KeySelector = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], "torch.Tensor | None"]
_SELECT: contextvars.ContextVar[tuple[frozenset[int], KeySelector] | None] = contextvars.ContextVar(
    "flowsieve_key_selector", default=None
)
_REGISTERED = False


def register() -> None:
    """Register the observation attention and its mask function with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _REGISTERED = True


@dataclass
class ObserveSpec:
    """What to record. Everything is off by default; a scorer turns on what it needs.

    Attributes:
        rows: absolute query positions whose attention rows (and value-value rows) are recorded.
            Negative numbers count from the end of the *first* forward pass (``-1`` = its last token).
        received: sum of attention received per key over all queries (chunked).
        received_max: highest attention any query of the pass gave each key, per head (chunked;
            KVzip's reconstruction score).
        head_stats: per-head first-token mass and output norm (all rows) and normalised row
            entropy (every ``entropy_stride``-th row of each chunk).
        norms: L2 norms of keys and values per KV head.
        transitions: TTV inputs (norm ratio and cosine distance of attention/MLP blocks).
        surprisal: -log p(token | prefix) of every token, by absolute position (the first token of
            the first pass gets 0: nothing predicts it). Costs one output-head product per token.
        layers: restrict to these layer indices (None = all).
        row_stride: 1 scans every query row (exact). k > 1 scans every k-th chunk of query rows (and
            the last chunk) for
            ``received`` and the per-row head statistics (an estimate; the output then comes from
            stock SDPA and costs little more than a plain pass); visibility is still counted exactly.
        current: record the attention row of the last query of every call under key ``-1`` of
            ``rows`` (decode-time methods score with the step's own query).
        slots: index per-key values by the key's slot in the cache (what an evicting cache needs)
            instead of by absolute token index (what a trace shows).
        workers: threads that scan query chunks in parallel when every row is scanned, each with
            one torch thread (bounded by ``torch.get_num_threads()``); None = one per torch thread.
            On 2 cores two workers make a 4k-token observed forward ~15% faster end to end than one
            scan with two intra-op threads; each worker holds its own scratch buffer (~6 MiB).
        chunk: query rows per chunk when every row is needed; None sizes chunks so that the scores
            of one KV-head group (g x chunk x L floats) stay near 6 MiB, in cache (exact scan), or
            all heads' scores (H x chunk x L) near 8 MiB (sampled scan).
    """

    rows: Sequence[int] = ()
    received: bool = False
    received_max: bool = False
    head_stats: bool = False
    norms: bool = False
    transitions: bool = False
    surprisal: bool = False
    layers: Sequence[int] | None = None
    chunk: int | None = None
    entropy_stride: int = 8
    row_stride: int = 1
    workers: int | None = None
    slots: bool = False
    current: bool = False

    def __post_init__(self) -> None:
        bad_workers = self.workers is not None and self.workers < 1
        if (
            (self.chunk is not None and self.chunk < 1)
            or self.entropy_stride < 1
            or self.row_stride < 1
            or bad_workers
        ):
            raise FlowsieveError(
                f"chunk, entropy_stride, row_stride and workers must be >= 1, got {self.chunk}, "
                f"{self.entropy_stride}, {self.row_stride}, {self.workers}"
            )

    @property
    def needs_all_rows(self) -> bool:
        return self.received or self.received_max or self.head_stats


@dataclass
class LayerObs:
    """What one layer recorded. Tensors are float32 on CPU.

    Attributes:
        rows: position -> attention probabilities of that query, (B, H, L).
        vv_rows: position -> softmax over keys of (value of that query) . (values), per KV head, (B, Hk, L).
        received: attention received per key, summed over queries, (B, H, L).
        received_max: attention received per key, maximum over queries, (B, H, L).
        visible: number of scanned queries that could see each key, (B, L).
        visible_all: number of all queries that could see each key, (B, L) (= visible when exact).
        first_mass: per-head sum over scanned query rows, (B, H); divide by ``n_prob_rows``.
        out_norm: per-head sum of output norms over all query rows, (B, H); divide by ``n_rows``.
        row_entropy: per-head sum of normalised row entropy over sampled rows; divide by ``n_entropy_rows``.
        key_norm / value_norm: (B, Hk, L) for the keys present at the last call.
        value_l1: L1 norm of the head-mean value vector per key, (B, L) (FlowCut's weighting).
        ttv: per-block (``"attn"``, ``"mlp"``) lists of (norm ratio, cosine distance), each (B, T).
        token_nll: surprisal of every token so far, (B, T) by absolute position (shared by all layers).
    """

    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    vv_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    received: torch.Tensor | None = None
    received_max: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    first_mass: torch.Tensor | None = None
    row_entropy: torch.Tensor | None = None
    out_norm: torch.Tensor | None = None
    n_rows: int = 0
    n_prob_rows: int = 0
    n_entropy_rows: int = 0
    visible_all: torch.Tensor | None = None
    key_norm: torch.Tensor | None = None
    value_norm: torch.Tensor | None = None
    value_l1: torch.Tensor | None = None
    ttv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    token_nll: torch.Tensor | None = None


def _add_growing(acc: torch.Tensor | None, new: torch.Tensor, offset: int = 0, size: int = 0) -> torch.Tensor:
    """acc[..., offset:offset+n] += new, growing ``acc`` along the last dim as the sequence grows.

    ``size`` pre-sizes a new accumulator (the sequence length known so far) so that chunk after chunk
    adds in place instead of reallocating.
    """
    end = offset + new.shape[-1]
    if acc is None:
        acc = new.new_zeros((*new.shape[:-1], max(end, size)))
    elif acc.shape[-1] < end:
        pad = new.new_zeros((*acc.shape[:-1], max(end, size) - acc.shape[-1]))
        acc = torch.cat([acc, pad], dim=-1)
    acc[..., offset:end] += new
    return acc


def _max_growing(acc: torch.Tensor | None, new: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """acc[..., offset:offset+n] = max(acc, new), growing ``acc`` (zeros) along the last dim."""
    end = offset + new.shape[-1]
    if acc is None:
        acc = new.new_zeros((*new.shape[:-1], end))
    elif acc.shape[-1] < end:
        acc = torch.cat([acc, new.new_zeros((*acc.shape[:-1], end - acc.shape[-1]))], dim=-1)
    torch.maximum(acc[..., offset:end], new, out=acc[..., offset:end])
    return acc


class Observer:
    """Collects :class:`LayerObs` for one model while active. Use :func:`observe`."""

    def __init__(self, model: nn.Module, spec: ObserveSpec) -> None:
        self.model = model
        self.spec = spec
        self.layers: dict[int, LayerObs] = {}
        self.attn_modules = attention_modules(model)
        self._module_ids = {id(m) for m in self.attn_modules}
        self._first_len: int | None = None  # tokens after the first forward (resolves negative rows)
        self._seen: dict[int, int] = {}  # layer -> tokens already in its cache when the call started
        self.on_layer: Callable[[int], None] | None = None
        self.token_nll: torch.Tensor | None = None  # (B, tokens seen) surprisal, when observed
        self._last_logprobs: torch.Tensor | None = None  # (B, V) of the last position so far

    def layer(self, idx: int) -> LayerObs:
        if idx not in self.layers:
            self.layers[idx] = LayerObs()
        return self.layers[idx]

    def wants(self, idx: int) -> bool:
        return self.spec.layers is None or idx in self.spec.layers

    def pad_rows(self, total: int) -> None:
        """Zero-extend recorded attention rows to ``total`` keys: a row recorded in an earlier
        forward of the same observation (e.g. a context, then its question) saw fewer keys, and
        cannot attend to the later ones."""
        for rec in self.layers.values():
            for rows in (rec.rows, rec.vv_rows):
                for p, r in rows.items():
                    if r.shape[-1] < total:
                        rows[p] = torch.nn.functional.pad(r, (0, total - r.shape[-1]))

    def row_positions(self, total: int) -> list[int]:
        if self._first_len is None:
            self._first_len = total
        return sorted({p if p >= 0 else self._first_len + p for p in self.spec.rows})


# ----------------------------------------------------------------------------------------- adapter


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (Llama/Gemma/Qwen ``model.layers``, BERT ``encoder.layer``, GPT-2 ``h``)."""
    base = getattr(model, "base_model", model)
    for path in ("layers", "model.layers", "language_model.layers", "encoder.layer", "h", "transformer.h"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise FlowsieveError(f"cannot find the transformer layers of {type(model).__name__}")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """One self-attention module per layer, in layer order; each gets a ``layer_idx`` if missing."""
    mods = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None and hasattr(layer, "attention"):  # BERT: layer.attention.self
            attn = getattr(layer.attention, "self", None)
        if attn is None:
            attn = getattr(layer, "attn", None)
        if attn is None:
            raise FlowsieveError(f"cannot find the attention module of layer {i} in {type(model).__name__}")
        if getattr(attn, "layer_idx", None) is None:
            attn.layer_idx = i
        mods.append(attn)
    return mods


def _layer_blocks(layer: nn.Module) -> dict[str, nn.Module]:
    blocks = {}
    if hasattr(layer, "self_attn"):
        blocks["attn"] = layer.self_attn
    if hasattr(layer, "mlp"):
        blocks["mlp"] = layer.mlp
    return blocks


def supports_transitions(model: nn.Module) -> bool:
    """TTV needs separate attention and MLP blocks with (normed input) -> (output before the residual)."""
    return all(len(_layer_blocks(layer)) == 2 for layer in decoder_layers(model))


def is_causal(model: nn.Module) -> bool:
    return bool(getattr(attention_modules(model)[0], "is_causal", True))


# -------------------------------------------------------------------------------- attention function


def _mask_chunk(
    attention_mask: torch.Tensor | None, causal: bool, q_len: int, kv_len: int, a: int, b: int
) -> tuple[str, torch.Tensor | None, int]:
    """How to mask query rows [a, b): (kind, mask, n) with kind in {"none", "causal", "bool", "float"}.

    ``n`` is the number of leading keys any of these rows can see. Mirrors the stock SDPA path for the
    same arguments (no mask + causal + q > 1 means top-left causal over the first q keys).
    """
    if attention_mask is None:
        if causal and q_len > 1:
            return "causal", None, min(b, kv_len)
        return "none", None, kv_len
    m = attention_mask[:, :, a:b, :kv_len]
    return ("bool" if m.dtype == torch.bool else "float"), m, kv_len


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query (B, H, q, d); key/value (B, Hk, L, d) after the cache update -> output (B, q, H, d)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    obs = _ACTIVE.get()
    idx = getattr(module, "layer_idx", None)
    sel = _SELECT.get()
    if sel is not None and id(module) in sel[0]:
        picked = sel[1](module, query, key, query.shape[-1] ** -0.5 if scaling is None else scaling)
        if picked is not None:
            if obs is not None and id(module) in obs._module_ids and idx is not None and obs.wants(idx):
                raise FlowsieveError("observation and key selection cannot run in the same attention call")
            causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
            key, value, attention_mask = _gather_keys(picked, query, key, value, attention_mask, causal)
    if obs is None or id(module) not in obs._module_ids or idx is None or not obs.wants(idx):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise FlowsieveError("observation does not support attention soft-capping or position bias")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    spec = obs.spec
    rec = obs.layer(idx)
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    B, H, q, _ = query.shape
    Hk, L = key.shape[1], key.shape[2]
    g = H // Hk
    # absolute coordinates: queries are tokens [seen, seen+q); the L keys are tokens [koff, koff+L)
    # (a sliding-window layer stores only the last tokens, so koff > 0 there)
    seen = obs._seen.get(idx, 0)
    total = seen + q
    koff = total - L
    rows = [p for p in obs.row_positions(total) if seen <= p < total]
    if spec.current and total - 1 not in rows:
        rows.append(total - 1)
    # where per-key values are placed: absolute token index, or the key's slot in this call's cache
    pk, pt = (0, L) if spec.slots else (koff, total)

    if spec.norms or rows:
        # FlowCut weights a token by the L1 norm of its head-mean value vector
        rec.value_l1 = _absolute(value.float().mean(1).abs().sum(-1), pk, pt)
    if spec.norms:
        rec.key_norm = _absolute(key.float().norm(dim=-1), pk, pt)
        rec.value_norm = _absolute(value.float().norm(dim=-1), pk, pt)

    out: torch.Tensor | None = None
    if spec.needs_all_rows and spec.row_stride == 1:
        # exact: every query row, and the output from the same probabilities, one KV-head group
        # (g query heads) at a time so that a chunk's scores (g x chunk x L floats, ~6 MiB) stay
        # in cache between the two matmuls and the softmax
        chunk = spec.chunk or max(16, min(1024, (3 << 19) // max(1, g * L)))
        out = torch.empty(B, q, H, value.shape[-1], dtype=query.dtype, device=query.device)
        starts = list(range(0, q, chunk))
        key_t = key.float().transpose(-1, -2).contiguous()  # (B,Hk,d,L)
        val = value.float()
        qs = query.float() * scaling
        track = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)

        def scan(part: list[int], acc: LayerObs) -> None:
            buf: list[torch.Tensor | None] = [None]  # scratch reused by this worker's chunks
            for a in part:
                b = min(a + chunk, q)
                c = b - a
                kind, mask, n = _mask_chunk(attention_mask, causal, q, L, a, b)
                vis = _visibility(attention_mask, causal, q, L, a, b, query.device)
                colsum = torch.empty(B, H, n, device=query.device)
                colmax = torch.empty(B, H, n, device=query.device) if spec.received_max else None
                first = torch.empty(B, H, device=query.device)
                ent = torch.empty(B, H, device=query.device)
                for h in range(Hk):
                    hs = slice(h * g, (h + 1) * g)
                    probs = _group_probs(qs, key_t, h, g, kind, mask, a, b, n, buf, track)  # (B,g,c,n)
                    o = probs.reshape(B, g * c, n) @ val[:, h, :n]  # (B, g*c, d)
                    out[:, a:b, hs] = o.view(B, g, c, -1).transpose(1, 2).to(out.dtype)
                    colsum[:, hs], first[:, hs], ent[:, hs], n_ent = _summaries(probs, vis[0], spec)
                    if colmax is not None:
                        colmax[:, hs] = probs.amax(-2)
                    for p in rows:
                        if seen + a <= p < seen + b:
                            acc.rows.setdefault(p, torch.empty(B, H, n, device=query.device))[:, hs] = probs[
                                :, :, p - seen - a
                            ]
                _fold(acc, spec, colsum, first, ent, c, n_ent, vis[1], pk, pt)
                if colmax is not None:
                    acc.received_max = _max_growing(acc.received_max, colmax, pk)
                for p in rows:
                    if seen + a <= p < seen + b:
                        acc.rows[p] = _absolute(acc.rows[p], pk, pt)

        workers = min(torch.get_num_threads(), len(starts), spec.workers or torch.get_num_threads())
        if workers > 1:
            _scan_parallel(scan, starts, workers, rec)
        else:
            scan(starts, rec)
    else:
        chunk = spec.chunk or max(16, min(1024, (1 << 21) // max(1, H * L)))
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        if spec.needs_all_rows:
            # sampled: every ``row_stride``-th chunk of query rows; visibility counted for all rows
            for ci, a in enumerate(range(0, q, chunk)):
                b = min(a + chunk, q)
                if ci % spec.row_stride == 0 or b == q:  # the last chunk always: recent keys
                    probs, _, vis = _chunk_probs(query, key, attention_mask, causal, scaling, a, b)
                    _accumulate(rec, spec, probs, vis, pk, pt)
                if spec.received:
                    cols_all = _visibility(attention_mask, causal, q, L, a, b, query.device)[1]
                    rec.visible_all = _add_growing(rec.visible_all, cols_all.expand(B, -1), pk, pt)
        if rows:
            # one pass over the span of requested rows when it is short (an observation window),
            # row by row otherwise
            lo, hi = rows[0] - seen, rows[-1] - seen + 1
            spans = [(lo, hi)] if hi - lo <= 256 else [(p - seen, p - seen + 1) for p in rows]
            for a, b in spans:
                probs, _, _ = _chunk_probs(query, key, attention_mask, causal, scaling, a, b)
                for p in rows:
                    if a <= p - seen < b:
                        rec.rows[p] = _absolute(probs[:, :, p - seen - a], pk, pt)
    if spec.head_stats:
        # per-head output norm over every row: (B,q,H,d) -> (B,H)
        rec.out_norm = _add_growing(rec.out_norm, out.float().norm(dim=-1).sum(1))
        rec.n_rows += q
    if spec.received and spec.row_stride == 1:
        rec.visible_all = rec.visible
    if spec.current:
        rec.rows[-1] = rec.rows[total - 1]
    for p in rows:
        # value-value "semantic" attention of FlowCut: softmax_j(v_p . v_j / sqrt(d)) per KV head,
        # over the keys the query can see (causal: up to and including p)
        vf = value[:, :, : p - koff + 1].float() if causal else value.float()
        vp = value[:, :, p - koff : p - koff + 1].float()  # (B,Hk,1,d)
        vv = (vp @ vf.transpose(-1, -2)) / math.sqrt(value.shape[-1])
        rec.vv_rows[p] = _absolute(torch.softmax(vv[:, :, 0], dim=-1), pk, pt)
    if obs.on_layer is not None:
        obs.on_layer(idx)
    return out, None


def _gather_keys(
    picked: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keep only the key slots ``picked`` (n,) of key/value (B, Hk, L, d) and of the mask's columns.

    The mask keeps its meaning: a chunk of q > 1 queries with no mask (a first pass, bottom-right
    causal over the L keys) gets an explicit causal mask before its columns are gathered.
    """
    picked = picked.to(device=key.device, dtype=torch.long)
    q, L = query.shape[2], key.shape[2]
    if attention_mask is None and causal and q > 1:
        rows = torch.arange(L - q, L, device=key.device)[:, None]
        attention_mask = (torch.arange(L, device=key.device)[None, :] <= rows)[None, None]
    if attention_mask is not None:
        attention_mask = attention_mask[..., :L].index_select(-1, picked)
    return key.index_select(2, picked), value.index_select(2, picked), attention_mask


@contextlib.contextmanager
def select_keys(model: nn.Module, selector: KeySelector) -> Iterator[None]:
    """Inside the block, every attention call of ``model`` attends only to the keys its selector picks.

    ``selector(module, query, key, scaling)`` gets the call's queries (B, H, q, d) and all its keys
    (B, Hk, L, d) after the cache update, and returns the key slots to attend to, a sorted int
    tensor (n,) shared by all heads, or None to attend to all L keys. The cache is not changed.
    The attention implementation is switched to the flowsieve function and restored on exit.
    """
    register()
    ids = frozenset(id(m) for m in attention_modules(model))
    previous = model.config._attn_implementation
    token = _SELECT.set((ids, selector))
    try:
        model.set_attn_implementation(ATTN_NAME)
        yield
    finally:
        _SELECT.reset(token)
        model.set_attn_implementation(previous)


_POOL: Any = None


def _pool(workers: int) -> Any:
    """A persistent thread pool: threads (and their allocator arenas) are reused across layers."""
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flowsieve-scan")
    return _POOL


def _scan_parallel(
    scan: Callable[[list[int], LayerObs], None], starts: list[int], workers: int, rec: LayerObs
) -> None:
    """Run ``scan`` over interleaved shares of the chunks in ``workers`` threads, one torch thread each.

    The chunk matmuls are thin (head dim 64) and gain little from intra-op threads, while separate
    chunks are independent: one chunk per core is faster. Each worker accumulates into its own
    :class:`LayerObs`; the sums are merged into ``rec`` afterwards.
    """
    parts = [starts[i::workers] for i in range(workers)]
    accs = [LayerObs() for _ in parts]
    threads = torch.get_num_threads()
    # grad and inference modes are thread-local: carry the caller's into the workers
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(part: list[int], acc: LayerObs) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            scan(part, acc)

    pool = _pool(workers)
    torch.set_num_threads(1)
    try:
        for f in [pool.submit(run, part, acc) for part, acc in zip(parts, accs)]:
            f.result()
    finally:
        torch.set_num_threads(threads)
    for acc in accs:
        rec.rows.update(acc.rows)
        rec.n_prob_rows += acc.n_prob_rows
        rec.n_entropy_rows += acc.n_entropy_rows
        for name in ("received", "visible", "first_mass", "row_entropy"):
            part = getattr(acc, name)
            if part is not None:
                setattr(rec, name, _add_growing(getattr(rec, name), part))
        if acc.received_max is not None:
            rec.received_max = _max_growing(rec.received_max, acc.received_max)


def _absolute(x: torch.Tensor, koff: int, total: int) -> torch.Tensor:
    """Place per-key values (..., n) for tokens [koff, koff+n) into a zero row of length ``total``."""
    return torch.nn.functional.pad(x.float(), (koff, total - koff - x.shape[-1]))


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _visibility(
    attention_mask: torch.Tensor | None, causal: bool, q_len: int, kv_len: int, a: int, b: int, dev: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """For query rows [a, b): keys each row can see (B|1, 1, c) and rows that see each key (B|1, n)."""
    kind, mask, n = _mask_chunk(attention_mask, causal, q_len, kv_len, a, b)
    c = b - a
    if kind == "causal":
        rows_vis = torch.arange(a + 1, b + 1, device=dev, dtype=torch.float32).view(1, 1, c)
        cols_vis = torch.full((1, n), float(c), device=dev)
        cols_vis[0, n - c :] = torch.arange(c, 0, -1, device=dev, dtype=torch.float32)
        return rows_vis, cols_vis
    if kind == "none":
        return torch.full((1, 1, c), float(n), device=dev), torch.full((1, n), float(c), device=dev)
    assert mask is not None
    allowed = _allowed(mask)
    return allowed.sum(-1).float()[:, :1], allowed[:, 0].sum(-2).float()


def _chunk_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    scaling: float,
    a: int,
    b: int,
) -> tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]]:
    """Attention probabilities of query rows [a, b) over the first n keys (all heads at once).

    Returns:
        probs (B, H, c, n) in fp32; n; and visibility counts: keys each row can see (B|1, 1, c) and
        rows that can see each key (B|1, n).
    """
    B, H, q, d = query.shape
    Hk, L = key.shape[1], key.shape[2]
    g = H // Hk
    kind, mask, n = _mask_chunk(attention_mask, causal, q, L, a, b)
    c = b - a
    # in-place softmax only when autograd is not recording
    track = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    # group query heads by their KV head instead of repeating K: (B,Hk,g*c,d) @ (B,Hk,d,n)
    qg = (query[:, :, a:b].float() * scaling).reshape(B, Hk, g * c, d)
    s = (qg @ key[:, :, :n].float().transpose(-1, -2)).view(B, H, c, n)
    vis = _visibility(attention_mask, causal, q, L, a, b, query.device)
    return _masked_softmax(s, kind, mask, track), n, vis


def _masked_softmax(s: torch.Tensor, kind: str, mask: torch.Tensor | None, track: bool) -> torch.Tensor:
    """Mask scores (B, h, c, n) of one chunk (``kind``/``mask`` from :func:`_mask_chunk`) and softmax
    over the keys, in place unless autograd is recording (``track``)."""
    c, n = s.shape[-2], s.shape[-1]
    if kind == "causal":
        # keys before the chunk are visible to every row; only the last c x c block is triangular
        tri = torch.ones(c, c, dtype=torch.bool, device=s.device).triu(1)
        s[..., n - c :].masked_fill_(tri, float("-inf"))
    elif kind in ("bool", "float"):
        assert mask is not None
        if kind == "float":
            s = s + mask.float() if track else s.add_(mask.float())
        allowed = _allowed(mask)
        s = s.masked_fill(~allowed, float("-inf")) if track else s.masked_fill_(~allowed, float("-inf"))
    # in place: one buffer per chunk instead of two
    p = torch.softmax(s, -1) if track else torch.ops.aten._softmax.out(s, -1, False, out=s)
    if kind in ("bool", "float"):
        # a fully masked row (padding) gives NaN in softmax; SDPA returns zeros there
        p = torch.nan_to_num(p, nan=0.0) if track else torch.nan_to_num_(p, nan=0.0)
    return p


def _group_probs(
    qs: torch.Tensor,
    key_t: torch.Tensor,
    h: int,
    g: int,
    kind: str,
    mask: torch.Tensor | None,
    a: int,
    b: int,
    n: int,
    buf: list[torch.Tensor | None],
    track: bool,
) -> torch.Tensor:
    """Probabilities of query rows [a, b) of the g query heads of KV head ``h`` over the first n keys.

    qs (B, H, q, d) scaled fp32 queries; key_t (B, Hk, d, L) fp32 keys. Returns (B, g, c, n) fp32,
    living in the scratch ``buf`` (valid until the next call) unless autograd is recording.
    """
    B, d, c = qs.shape[0], qs.shape[-1], b - a
    qg = qs[:, h * g : (h + 1) * g, a:b].reshape(B, g * c, d)
    kt = key_t[:, h, :, :n]
    if track:
        s = (qg @ kt).view(B, g, c, n)
    else:
        size = B * g * c * n
        if buf[0] is None or buf[0].numel() < size:
            buf[0] = torch.empty(size, dtype=torch.float32, device=qs.device)
        s = buf[0][:size].view(B, g * c, n)
        torch.bmm(qg, kt, out=s)
        s = s.view(B, g, c, n)
    return _masked_softmax(s, kind, mask, track)


def _summaries(
    probs: torch.Tensor, rows_vis: torch.Tensor, spec: ObserveSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per-head sums of one chunk of probabilities (B, h, c, n): received per key (B, h, n),
    first-token mass (B, h), normalised row entropy over every ``entropy_stride``-th row (B, h), and
    the number of rows that entropy sum covers."""
    B, h = probs.shape[:2]
    colsum = probs.sum(-2)
    first = probs[..., 0].sum(-1)
    st = spec.entropy_stride
    sub = probs[:, :, ::st]
    if not spec.head_stats:
        return colsum, first, torch.zeros(B, h, device=probs.device), sub.shape[2]
    # a full pass of log over all rows costs as much as the attention itself; a head-level mean
    # needs far fewer rows
    vis = rows_vis[..., ::st].expand(B, h, -1)  # (B,h,c') keys each row could see
    e = -(sub * torch.log(sub.clamp(min=1e-30))).sum(-1)  # (B,h,c') row entropy
    norm_ent = torch.where(vis > 1, e / torch.log(vis.clamp(min=2)), torch.zeros_like(e))
    return colsum, first, norm_ent.sum(-1), sub.shape[2]


def _fold(
    rec: LayerObs,
    spec: ObserveSpec,
    colsum: torch.Tensor,
    first: torch.Tensor,
    ent: torch.Tensor,
    n_rows: int,
    n_ent: int,
    cols_vis: torch.Tensor,
    koff: int,
    total: int,
) -> None:
    """Add one chunk's per-head sums to the running per-layer statistics."""
    B = colsum.shape[0]
    rec.n_prob_rows += n_rows
    if spec.received:
        rec.received = _add_growing(rec.received, colsum, koff, total)
        rec.visible = _add_growing(rec.visible, cols_vis.expand(B, -1), koff, total)
    if spec.head_stats:
        rec.n_entropy_rows += n_ent
        rec.first_mass = _add_growing(rec.first_mass, first)
        rec.row_entropy = _add_growing(rec.row_entropy, ent)


def _accumulate(
    rec: LayerObs,
    spec: ObserveSpec,
    probs: torch.Tensor,
    vis: tuple[torch.Tensor, torch.Tensor],
    koff: int,
    total: int,
) -> None:
    """Fold one chunk of probabilities (B, H, c, n) into the running per-layer statistics."""
    colsum, first, ent, n_ent = _summaries(probs, vis[0], spec)
    _fold(rec, spec, colsum, first, ent, probs.shape[2], n_ent, vis[1], koff, total)
    if spec.received_max:
        rec.received_max = _max_growing(rec.received_max, probs.amax(-2), koff)


# --------------------------------------------------------------------------------- transitions (TTV)


def _transition_hooks(obs: Observer) -> list[Any]:
    handles = []
    for i, layer in enumerate(decoder_layers(obs.model)):
        if not obs.wants(i):
            continue
        blocks = _layer_blocks(layer)
        if len(blocks) != 2:
            raise FlowsieveError(
                f"transition signals need separate attention and MLP blocks; "
                f"{type(layer).__name__} does not expose them"
            )
        for name, mod in blocks.items():

            def hook(
                mod: nn.Module, args: tuple, kwargs: dict, output: Any, i: int = i, name: str = name
            ) -> None:
                before = kwargs.get("hidden_states", args[0] if args else None)
                after = output[0] if isinstance(output, tuple) else output
                if before is None or after is None:
                    return
                b, a = before.float(), after.float()
                nb = b.norm(dim=-1).clamp(min=1e-12)  # (B,T)
                na = a.norm(dim=-1)
                ratio = na / nb
                dist = 1.0 - (a * b).sum(-1) / (na.clamp(min=1e-12) * nb)  # 1 - cos(before, after)
                obs.layer(i).ttv.setdefault(name, []).append((ratio, dist))

            handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    return handles


def _surprisal_hooks(obs: Observer, rows: int = 256) -> list[Any]:
    """Score every token's surprisal from the decoder's final hidden states and the output head
    (``rows`` positions at a time, so the (rows, vocab) log-probabilities stay small). A token that
    opens a later forward (a chunk or a continuation) is scored from the previous forward's last
    position."""
    model = obs.model
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        raise FlowsieveError(
            f"surprisal needs a causal LM with an output head; {type(model).__name__} has none"
        )
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    cap = getattr(cfg, "final_logit_softcapping", None)

    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise FlowsieveError("surprisal needs input_ids (not inputs_embeds)")
        h = output[0] if isinstance(output, tuple) else output.last_hidden_state  # (B, q, d)
        B, q = ids.shape
        nll = torch.zeros(B, q)
        if obs._last_logprobs is not None:
            nll[:, 0] = -obs._last_logprobs.gather(1, ids[:, :1].cpu())[:, 0]
        for a in range(0, q, rows):
            b = min(a + rows, q)
            logits = head(h[:, a:b]).float()
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            lp = torch.log_softmax(logits, dim=-1).cpu()  # (B, c, V): positions a..b-1
            nxt = ids[:, a + 1 : b + 1].cpu()  # the tokens they predict
            n = nxt.shape[1]
            nll[:, a + 1 : a + 1 + n] = -lp[:, :n].gather(-1, nxt[..., None])[..., 0]
            if b == q:
                obs._last_logprobs = lp[:, -1]
        obs.token_nll = nll if obs.token_nll is None else torch.cat([obs.token_nll, nll], dim=1)
        for i in range(len(obs.attn_modules)):
            if obs.wants(i):
                obs.layer(i).token_nll = obs.token_nll

    return [base.register_forward_hook(hook, with_kwargs=True)]


def _offset_hooks(obs: Observer) -> list[Any]:
    """Record, before each attention call, how many tokens its cache layer already holds."""

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        i = mod.layer_idx
        seen = 0
        if cache is not None and hasattr(cache, "layers") and i < len(cache.layers):
            seen = int(cache.get_seq_length(i))
        obs._seen[i] = seen

    return [m.register_forward_pre_hook(pre, with_kwargs=True) for m in obs.attn_modules]


@contextlib.contextmanager
def observe(model: nn.Module, spec: ObserveSpec) -> Iterator[Observer]:
    """Record observations of every forward pass of ``model`` inside the block.

    The model's attention implementation is switched to the observation function and restored on
    exit; hooks are always removed, also when the block raises.
    """
    register()
    obs = Observer(model, spec)
    previous = model.config._attn_implementation
    handles = _offset_hooks(obs) + (_transition_hooks(obs) if spec.transitions else [])
    if spec.surprisal:
        handles += _surprisal_hooks(obs)
    token = _ACTIVE.set(obs)
    try:
        model.set_attn_implementation(ATTN_NAME)
        yield obs
    finally:
        _ACTIVE.reset(token)
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)

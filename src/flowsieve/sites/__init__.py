"""Sites: where a method is applied. One module per site, one protocol (:mod:`flowsieve.sites.base`).

- ``prefill``: compress the cache right after the prompt's forward pass (:mod:`.prefill`);
- ``decode``: the same, then keep the cache within a capacity at every decode step (:mod:`.decode`);
- ``select``: keep the whole cache, attend to a chosen subset at every step (:mod:`.select`);
- ``layer``: drop context tokens from the residual stream between decoder layers (:mod:`.layer`);
- ``prompt``: drop text before any model reads it (:mod:`.prompt`; it works on text, so it has
  :func:`~flowsieve.sites.prompt.compress_prompt` instead of a cache prefill).

:func:`prefill_cache` prefills a prompt at the sieve's site (or uncompressed without a sieve).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError, did_you_mean
from flowsieve.inputs import Prompt
from flowsieve.kvcache import plain_cache, stored_tokens
from flowsieve.sites.base import Prefilled, Site, forward
from flowsieve.sites.decode import DecodeSite
from flowsieve.sites.layer import LayerSite
from flowsieve.sites.prefill import PrefillSite
from flowsieve.sites.select import SelectSite

if TYPE_CHECKING:
    from flowsieve.sieve import Sieve

SITES: dict[str, Site] = {s.name: s for s in (PrefillSite(), DecodeSite(), SelectSite(), LayerSite())}
TEXT_SITES = ("prompt",)  # sites that act on text, before the model

__all__ = ["SITES", "TEXT_SITES", "Prefilled", "Site", "get_site", "prefill_cache"]


def get_site(name: str) -> Site:
    """The cache site called ``name``; a one-line error for an unknown one."""
    site = SITES.get(name)
    if site is None:
        known = [*SITES, *TEXT_SITES]
        hint = " (it compresses text: flowsieve.compress_prompt)" if name in TEXT_SITES else ""
        raise FlowsieveError(
            f"no cache site '{name}'{hint}{did_you_mean(name, known)}; cache sites: {', '.join(SITES)}"
        )
    return site


@torch.inference_mode()
def prefill_cache(
    model: nn.Module, prompt: Prompt, sieve: Sieve | None, mode: str, tokenizer: Any = None, chat: bool = True
) -> Prefilled:
    """Prefill ``prompt`` at ``sieve``'s site, or into transformers' own cache without a sieve.

    ``tokenizer`` and ``chat`` (whether ``prompt`` uses the chat template) are needed by methods
    that replay the context (KVzip) and ignored otherwise."""
    if sieve is None:
        cache = plain_cache(model)
        logits = forward(model, cache, prompt.ids)
        return Prefilled(cache, logits, stored_tokens(cache), {})
    sieve = sieve.resolve(mode)
    return get_site(sieve.site).prefill(model, prompt, sieve, mode, tokenizer, chat)

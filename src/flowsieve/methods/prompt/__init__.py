"""Prompt-site methods: scorers that rate a prompt's tokens before any model reads it.

The prompt site (:func:`flowsieve.sites.prompt.compress_prompt`) keeps the best-rated units.
Scorers (one file each):

- ``selfinfo``: LLMLingua-1 (budget controller + iterative token-level compression with a causal LM);
- ``longllmlingua``: its question-aware variant (contrastive perplexity);
- ``lexrank``: sentence-level LexRank, no model;
- ``flow``: words ranked by the information flow into the answer position (a trace);
- ``distilled``: LLMLingua-2's recipe: a keep/drop token classifier on a small encoder, trained
  locally on labels from ``selfinfo`` (``scripts/train_distilled.py``).
"""

from flowsieve.methods.prompt import distilled, flow, lexrank, longllmlingua, selfinfo  # noqa: F401  (registration)
from flowsieve.methods.prompt.base import SCORERS, CompressedPrompt, PromptDoc, PromptScorer, Scores

__all__ = ["SCORERS", "CompressedPrompt", "PromptDoc", "PromptScorer", "Scores"]

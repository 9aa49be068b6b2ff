"""The prompt site: compress a prompt's text before any model reads it.

``compress_prompt(text, scorer=..., keep=..., question=...)`` keeps about ``keep`` of the prompt's
tokens, in order, always keeping the question and force-kept tokens. Scorers (one file each):

- ``selfinfo``: LLMLingua-1 (budget controller + iterative token-level compression with a causal LM);
- ``longllmlingua``: its question-aware variant (contrastive perplexity);
- ``lexrank``: sentence-level LexRank, no model;
- ``flow``: words ranked by the information flow into the answer position (a trace);
- ``distilled``: LLMLingua-2's recipe: a keep/drop token classifier on a small encoder, trained
  locally on labels from ``selfinfo`` (``scripts/train_distilled.py``).
"""

from flowsieve.prompt import distilled, flow, lexrank, longllmlingua, selfinfo  # noqa: F401  (registration)
from flowsieve.prompt.base import SCORERS, CompressedPrompt, PromptDoc, PromptScorer, Scores
from flowsieve.prompt.compress import compress_prompt

__all__ = ["SCORERS", "CompressedPrompt", "PromptDoc", "PromptScorer", "Scores", "compress_prompt"]

"""flowsieve: measure information flow between tokens in transformers and keep the tokens that matter."""

from flowsieve.errors import FlowsieveError
from flowsieve.models import DEFAULT_MODEL, load

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "FlowsieveError",
    "Sieve",
    "__version__",
    "compress_prompt",
    "load",
]


def __getattr__(name: str):  # lazy: these import torch
    if name == "compress_prompt":
        from flowsieve.sites.prompt import compress_prompt

        return compress_prompt
    if name == "Sieve":
        from flowsieve.sieve import Sieve

        return Sieve
    raise AttributeError(f"module 'flowsieve' has no attribute '{name}'")

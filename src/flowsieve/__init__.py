"""flowsieve: measure information flow between tokens in transformers and keep the tokens that matter."""

from flowsieve.errors import FlowsieveError
from flowsieve.models import DEFAULT_MODEL, load

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "FlowsieveError", "__version__", "load"]

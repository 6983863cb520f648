"""llmctl: the client library and command line for llmosd.  Never imports torch."""
from .client import Client, Generation
from .errors import LlmosdError
from . import errors

__all__ = ["Client", "Generation", "LlmosdError", "errors"]
__version__ = "0.1.0"

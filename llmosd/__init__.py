"""llmosd: the daemon that keeps a machine's language models in a model table."""
__version__ = "0.1.0"

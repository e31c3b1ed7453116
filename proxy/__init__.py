"""lmgate: share one LM Studio server safely behind an OpenAI-compatible queueing proxy."""

__version__ = "0.1.0"

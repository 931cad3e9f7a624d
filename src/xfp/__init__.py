"""XFP: quality-targeted LLM weight quantization."""
__version__ = "0.1.0"

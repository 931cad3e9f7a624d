"""XFP: quality-targeted LLM weight quantization."""
__version__ = "0.1.0"

from xfp.integrations import transformers as _transformers  # noqa: E402,F401  registers quant_method "xfp" with transformers

"""Reading model checkpoints tensor by tensor (HF folders, GGUF files) and fetching offline assets."""

from xfp.sources.base import TensorSource, open_source
from xfp.sources.fetch import (
    cache_dir,
    canterbury_text,
    default_model_gguf,
    default_model_hf,
    gemma_270m_gguf,
    gemma_270m_hf,
)

__all__ = [
    "TensorSource",
    "open_source",
    "cache_dir",
    "canterbury_text",
    "default_model_gguf",
    "default_model_hf",
    "gemma_270m_gguf",
    "gemma_270m_hf",
]

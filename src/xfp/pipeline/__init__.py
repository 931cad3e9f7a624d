"""From a source checkpoint to an XFP folder."""

from xfp.pipeline.run import quantize_model

__all__ = ["quantize_model"]

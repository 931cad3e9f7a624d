"""Running XFP matrices: `XFPLinear`, `XFPEmbedding` and the choice of kernel (`dispatch`)."""

from xfp.runtime.embedding import XFPEmbedding
from xfp.runtime.linear import XFPLinear

__all__ = ["XFPEmbedding", "XFPLinear"]

"""Running XFP matrices: the `XFPLinear` module and the choice of kernel (`dispatch`)."""

from xfp.runtime.linear import XFPLinear

__all__ = ["XFPLinear"]

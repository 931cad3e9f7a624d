"""Kernels that compute an XFP linear without decoding the whole matrix; `xfp.runtime.dispatch` picks one.

- `cpu`: fused C++ kernels for V2 and V2a matrices on x86-64 (AVX-512, AVX2) and any other CPU (portable C++),
  compiled on first use by `build` and cached.
"""

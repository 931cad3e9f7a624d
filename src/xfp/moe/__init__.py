"""Mixture-of-experts support: expert stacks (naming, fused/per-expert layouts), stack-wide auto-select,
the quantized experts module, and a real-weight upcycled test MoE (`xfp.moe.upcycle`)."""

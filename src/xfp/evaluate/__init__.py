"""Measuring: quality per honest bit.

perplexity.py  token windows (BOS handling, every token scored once) and `perplexity`
scoring.py     one pass over the windows: NLL of every model, KL(source || model) and top-1 agreement
models.py      what `xfp eval` / `xfp compare` accept as a model, BOS policy, the default text
generation.py  greedy generation and the generation sanity check (`garbage_score`)
baselines.py   RTN, NF (absmax) and HQQ baselines, with their honest byte counts
methods.py     the registry of methods `xfp compare` measures, and fake quantization
compare.py     `xfp compare`: the table, the JSON and the Pareto plot
verify.py      recompute per-channel cosines from the stored tensors (`xfp verify`)
"""

"""H-Process: fit a memory budget by searching the two floors (`xfp fit`).

table.py       measure once: per matrix, each candidate's honest bytes, cosine statistics, error estimate
search.py      pure search over the table: stepwise floor relaxation and greedy (Lagrangian) allocation
output.py      a plan written as a normal XFP folder (per-tensor pinned configs through the pipeline)
boundaries.py  memory (peak RSS, measured and predicted) and quality (KL, generation check) boundaries
report.py      fit.json, FIT.md, fit.png
run.py         `fit_model`: the whole job
"""

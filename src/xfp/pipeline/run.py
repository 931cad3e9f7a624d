"""`quantize_model`: a Hugging Face folder or a GGUF file in, an XFP folder that transformers loads out.

Layout of a run in OUT:
- `.xfp-work/state.json` names the source fingerprint and the config; `.xfp-work/NNNNN.{safetensors,json}`
  hold each finished tensor. `--resume` skips the finished ones; the final shards are assembled from the
  parts in tensor order, so a resumed run writes the same bytes as an uninterrupted one.
- At the end: shards, config.json, tokenizer files, report.json, REPORT.md, plots; `.xfp-work` removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

from xfp import __version__
from xfp.classify import Decision, classify
from xfp.config import FORMAT_VERSION, QuantConfig
from xfp.errors import XFPError
from xfp.format import io
from xfp.moe import pipeline as moe
from xfp.pipeline import report as reporting
from xfp.pipeline.worker import init_worker, is_float_label, part_paths, process_tensor, run_in_worker
from xfp.quantize import hot_columns
from xfp.quantize.hot_columns import HotColumns
from xfp.sources.base import TensorSource, open_source

WORKDIR = ".xfp-work"
DEFAULT_SHARD_BYTES = 2 * 1024**3


def quantize_model(src: str | Path, out: str | Path, config: QuantConfig, *, resume: bool = False,
                   force: bool = False, workers: int = 1, quantize_embeddings: bool = False,
                   progress: bool = True, shard_bytes: int = DEFAULT_SHARD_BYTES,
                   stop_after: int | None = None, overrides: dict[str, QuantConfig] | None = None) -> dict:
    """Quantize every tensor of `src` into the folder `out`; returns the report (also in report.json).

    stop_after: process at most this many new tensors, then stop as if interrupted (for tests of resume).
    overrides: {tensor name: QuantConfig} used for that tensor instead of `config` (the H-Process pins each
    matrix's width, group size and outlier cap this way, `xfp.fit`); hot columns still follow `config`.
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    _check_paths(src, out)
    source = open_source(src)
    state = {"source": str(src), "source_fingerprint": source.fingerprint(), "config": config.to_dict(),
             "quantize_embeddings": quantize_embeddings, "xfp_version": __version__}
    if overrides:
        state["overrides"] = {name: c.to_dict() for name, c in sorted(overrides.items())}
    workdir = _prepare_out(out, state, resume=resume, force=force)
    decisions = moe.plan_units(source, _decide(source, quantize_embeddings))  # routed experts: one unit per stack
    started = time.perf_counter()
    hot = hot_columns_of(source, decisions, config)
    summaries = _run_parts(src, source, decisions, config, hot, workdir, workers, progress, stop_after,
                           overrides or {})
    if summaries is None:
        raise XFPError(f"{out}: stopped after {stop_after} tensors; run again with --resume to finish")
    summaries = moe.flatten(summaries)
    shards = _assemble(out, workdir, len(decisions), shard_bytes)
    source.write_aux_files(out)
    report = reporting.build(src, source, out, config, summaries, shards, time.perf_counter() - started)
    reporting.write(out, report)
    model_config = source.config()
    model_config["quantization_config"] = quantization_config(config, summaries)
    io.atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(model_config, indent=2)))
    shutil.rmtree(workdir)
    return report


def quantization_config(config: QuantConfig, summaries: list[dict]) -> dict:
    """The `quantization_config` entry of config.json: the config, plus what sizes each quantized buffer."""
    layout_keys = ("mode", "bits", "outliers", "group", "library", "kept")
    matrices = {s["name"]: {"class": s["class"], **{k: s[k] for k in layout_keys if k in s}}
                for s in summaries if "bits" in s}
    return {"quant_method": "xfp", "format_version": FORMAT_VERSION, **config.to_dict(), "matrices": matrices}


def _check_paths(src: Path, out: Path) -> None:
    if out == src or src in out.parents:
        raise XFPError(f"{out}: the output must not be inside the source {src}")
    if out in src.parents:
        raise XFPError(f"{out}: the output must not contain the source {src}")
    if out.exists() and not out.is_dir():
        raise XFPError(f"{out}: exists and is not a folder")


def _prepare_out(out: Path, state: dict, *, resume: bool, force: bool) -> Path:
    workdir = out / WORKDIR
    state_path = workdir / "state.json"
    if out.exists() and any(out.iterdir()):
        if resume and state_path.is_file():
            previous = json.loads(state_path.read_text())
            if previous != state:
                changed = sorted(k for k in state if previous.get(k) != state[k])
                raise XFPError(f"{out}: cannot resume: the interrupted run used a different {', '.join(changed)}; "
                               "use --force to start over")
            return workdir
        if force and not _holds_xfp_output(out):
            raise XFPError(f"{out}: not empty and holds no XFP output; refusing to delete it (choose another folder)")
        if not force:
            hint = "it holds no interrupted run to resume; " if resume else ""
            raise XFPError(f"{out}: output folder is not empty; {hint}use --force to overwrite"
                           f"{'' if resume else ' or --resume to finish an interrupted run'}")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    io.atomic_write(state_path, lambda tmp: tmp.write_text(json.dumps(state)))
    return workdir


def _holds_xfp_output(out: Path) -> bool:
    if (out / WORKDIR).is_dir():
        return True
    try:
        return json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "xfp"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _decide(source: TensorSource, quantize_embeddings: bool) -> list[Decision]:
    cfg = source.config()
    return [classify(name, source.tensor_shape(name), is_float_label(source.tensor_dtype(name)), cfg,
                     quantize_embeddings=quantize_embeddings) for name in source.tensor_names()]


def hot_columns_of(source: TensorSource, decisions: list[Decision], config: QuantConfig) -> HotColumns:
    """The model's hot input columns (`xfp.quantize.hot_columns`) among the tensors to quantize; none unless
    mode v2a with keep_columns > 0. A pure function of the source and config, so a resumed run agrees."""
    if config.mode != "v2a" or config.keep_columns <= 0:
        return HotColumns(0.0)
    names, load = moe.hot_inputs(source, decisions)
    return hot_columns.find(names, load, config.keep_columns, tensor_names=source.tensor_names(),
                            config=source.config())


def _run_parts(src: Path, source: TensorSource, decisions: list[Decision], config: QuantConfig, hot: HotColumns,
               workdir: Path, workers: int, progress: bool, stop_after: int | None,
               overrides: dict[str, QuantConfig] | None = None) -> list[dict] | None:
    """Process every tensor not finished yet; None if stopped early by `stop_after`."""
    overrides = overrides or {}
    summaries: dict[int, dict] = {}
    todo = []
    for i, decision in enumerate(decisions):
        summary_path = part_paths(workdir, i)[1]
        if summary_path.is_file():
            summaries[i] = json.loads(summary_path.read_text())
        else:
            todo.append(i)
    stopped = stop_after is not None and len(todo) > stop_after
    if stop_after is not None:
        todo = todo[:stop_after]
    bar = tqdm(total=len(decisions), initial=len(summaries), unit="tensor", disable=not progress,
               desc="quantize", dynamic_ncols=True)

    def done(summary: dict) -> None:
        summaries[summary["index"]] = summary
        bits = f"{summary['bits']}b" if "bits" in summary else "kept"
        bar.set_postfix_str(f"{summary['name'][-40:]} {bits}", refresh=False)
        bar.update(1)

    if workers <= 1:
        for i in todo:
            done(process_tensor(source, i, decisions[i], overrides.get(decisions[i].name, config), workdir, hot))
    else:
        threads = max(1, torch.get_num_threads() // workers)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker,
                                 initargs=(str(src), threads)) as pool:
            futures = [pool.submit(run_in_worker, i, decisions[i], overrides.get(decisions[i].name, config),
                                   str(workdir), hot) for i in todo]
            for future in futures:
                done(future.result())
    bar.close()
    if stopped:
        return None
    return [summaries[i] for i in range(len(decisions))]


def _assemble(out: Path, workdir: Path, count: int, shard_bytes: int) -> list[dict]:
    """Group the parts, in order, into shards of about `shard_bytes`; write them and the index."""
    groups: list[list[int]] = [[]]
    size = 0
    for i in range(count):
        part = part_paths(workdir, i)[0].stat().st_size
        if groups[-1] and size + part > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += part
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    weight_map: dict[str, str] = {}
    shards = []
    for shard_name, group in zip(names, groups):
        content = io.XFPFile()
        for i in group:
            part = io.load(part_paths(workdir, i)[0])
            content.matrices.update(part.matrices)
            content.dense.update(part.dense)
        tensors, _ = io.flatten(content)
        weight_map.update({key: shard_name for key in tensors})
        io.save(out / shard_name, content)
        shards.append({"file": shard_name, "bytes": (out / shard_name).stat().st_size})
    if len(groups) > 1:
        total = sum(s["bytes"] for s in shards)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        io.atomic_write(out / "model.safetensors.index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    return shards


def out_is_complete(out: Path) -> bool:
    """True for a finished XFP folder (config.json written and no work in progress)."""
    return (out / "config.json").is_file() and not (out / WORKDIR).exists() and os.access(out, os.R_OK)

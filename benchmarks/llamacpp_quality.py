"""llama.cpp, the tool users would pick instead: its k-quants on the same windows, with honest bits.

OPTIONAL, not part of CI. Needs llama-cpp-python (it compiles llama.cpp from source, ~30-60 min on two
cores): `python benchmarks/llamacpp_quality.py --install` runs `pip install llama-cpp-python==0.3.36` first.

    python benchmarks/llamacpp_quality.py [smollm2|gemma-270m|FILE.gguf] [--types Q4_K_M,Q3_K_M,IQ4_XS]
        [--ctx 512] [--max-windows 32] [--out out/results/smollm2]

What it does:
1. writes the source GGUF back out with every tensor dequantized to F32 (gguf package; same metadata,
   same tensor names and layout, so llama.cpp sees exactly the weights xfp's methods start from);
2. quantizes that F32 file with llama.cpp's own `llama_model_quantize` to each type, without an imatrix,
   keeping the token embedding (and output) tensors unquantized in F16, as XFP's default folder stores them
   (and, since `xfp.runtime.half`, holds them in memory), so both sides read the same dense bytes per token;
3. scores each file with llama.cpp (`logits_all`) on the same windows as `xfp compare` (same token ids,
   same BOS policy), against the same reference (the transformers source model, float32): ppl, KL,
   top-1, in one pass. An "llama.cpp-F32" row shows the runtime's own difference from transformers;
4. scores XFP's default folder (`xfp quantize` with no options, the folder benchmarks/decode_speed.py
   times; `--no-xfp` skips it) on the same windows, through its fused kernel, so the speed race in
   docs/PERFORMANCE.md has both sides' KL from one run.
Honest bits: the bytes llama.cpp stores for the same tensors xfp quantizes (attention and MLP matrices;
k-quant mixes give some of them more bits, e.g. Q4_K_M puts attn_v / half of ffn_down at Q6_K, and rows
whose width is not a multiple of 256, as SmolLM2's 576, fall back to other block types) * 8 / their
weights; for XFP, its report's `quantized_honest_bits` over the same tensors. Writes llamacpp.json (rows
in `xfp compare`'s format) into --out; benchmarks/results.py adds those rows to the tables when the file
is there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

LLAMA_CPP_REQ = "llama-cpp-python==0.3.36"
DEFAULT_TYPES = ("Q4_K_M", "Q3_K_M", "IQ4_XS")
RESULTS = Path(__file__).resolve().parents[1] / "out" / "results"
"""Default parent of --out: out/results/<model alias> (benchmarks/decode_speed.py races the files found there)."""
RESULT_FILE = "llamacpp.json"


def gguf_of_type(out: Path, src: Path, type_name: str) -> Path:
    """The file this script writes for `src` quantized (or converted) to llama.cpp's `type_name` in `out`."""
    return out / f"{src.stem}.{type_name}.gguf"


def ensure_llama_cpp(install: bool):
    try:
        import llama_cpp
    except ImportError:
        if not install:
            sys.exit(f"llama_cpp is not installed: rerun with --install (pip install {LLAMA_CPP_REQ}, compiles "
                     "llama.cpp) or install it yourself")
        subprocess.run([sys.executable, "-m", "pip", "install", LLAMA_CPP_REQ], check=True)
        import llama_cpp
    return llama_cpp


def write_f32_gguf(src: Path, dst: Path) -> None:
    """`src` with the same metadata and tensors, every tensor dequantized to F32 (one in memory at a time)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
    shapes = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # numpy order
        shapes[tensor.name] = shape
        n_bytes = 4 * int(np.prod(shape))
        writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), n_bytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        writer.write_tensor_data(np.ascontiguousarray(values.reshape(shapes[tensor.name])))
    writer.close()


def quantize(llama_cpp, f32: Path, out: Path, type_name: str, threads: int) -> float:
    """llama.cpp's quantizer, no imatrix, token embedding and output kept F16; returns seconds."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads
    params.token_embedding_type = llama_cpp.GGML_TYPE_F16
    params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    began = time.perf_counter()
    code = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize({type_name}) returned {code}")
    return time.perf_counter() - began


def honest_bits(path: Path, hf_names: list[str]) -> tuple[float, int, int, dict[str, int]]:
    """(bits, stored bytes, weights, {type: tensors}) over the tensors xfp quantizes, as stored in `path`."""
    from gguf import GGUFReader

    from xfp.sources.gguf_file import GGUFSource

    mapping = GGUFSource(path)
    wanted = {mapping.gguf_name(n) for n in hf_names}
    stored = weights = 0
    types: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        if tensor.name in wanted:
            stored += int(tensor.n_bytes)
            weights += int(tensor.n_elements)
            types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return 8.0 * stored / weights, stored, weights, types


def without_extra_buffer_types(llama_cpp) -> None:
    """Load models with `use_extra_bufts = False` (llama-cpp-python's Llama does not expose it).

    The extra buffer types repack weights for AMX / other special kernels. On a VM that advertises AMX but
    does not let a process use it (seen here: SIGILL on `tilezero` in ggml_backend_amx_mul_mat), they crash
    the first matmul; the plain CPU path computes the same thing.
    """
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params
    if getattr(default, "_xfp_patched", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params._xfp_patched = True
    lib.llama_model_default_params = params


class LlamaCppLM(torch.nn.Module):
    """A llama.cpp model behind the `model(x).logits` interface `score_windows` calls."""

    def __init__(self, llama_cpp, path: Path, n_ctx: int, threads: int):
        super().__init__()
        without_extra_buffer_types(llama_cpp)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                   n_threads=threads, verbose=False)

    def forward(self, x: torch.Tensor):
        tokens = x[0].tolist()
        self.llm.reset()
        self.llm.eval(tokens)
        logits = np.array(self.llm.scores[:len(tokens)], dtype=np.float32)
        return SimpleNamespace(logits=torch.from_numpy(logits).unsqueeze(0))


XFP_ROW = "xfp-default-folder"
"""The row of XFP's default folder, scored on the same windows (`--no-xfp` skips it)."""


def xfp_default_folder(src: Path) -> Path:
    """The default-config XFP folder of `src` that benchmarks/decode_speed.py times (quantized once, cached)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from decode_speed import xfp_folder

    return xfp_folder(src)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", nargs="?", default="smollm2", help="smollm2, gemma-270m or a GGUF file")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="folder for llamacpp.json and the GGUF files (default out/results/<src>)")
    p.add_argument("--install", action="store_true", help=f"pip install {LLAMA_CPP_REQ} if missing")
    p.add_argument("--no-xfp", action="store_true",
                   help="skip the row of XFP's default folder (the one benchmarks/decode_speed.py times)")
    args = p.parse_args(argv)
    llama_cpp = ensure_llama_cpp(args.install)

    from xfp.evaluate import models
    from xfp.evaluate.methods import quantized_names
    from xfp.evaluate.perplexity import token_windows
    from xfp.evaluate.scoring import score_windows
    from xfp.sources.base import open_source

    src = models.resolve(args.src)
    if src.is_dir():
        sys.exit(f"{src}: this script needs a GGUF source (llama.cpp's HF converter is not part of the wheel)")
    out = Path(args.out) if args.out else RESULTS / (args.src if not Path(args.src).exists() else src.stem)
    out.mkdir(parents=True, exist_ok=True)
    folder = models.hf_folder(src)
    reference, tokenizer = models.load(folder)
    source = open_source(folder)
    names = quantized_names(source, source.config())
    ids = models.text_ids(tokenizer)
    bos = models.bos_to_prepend(tokenizer)
    windows = token_windows(ids, args.ctx, args.ctx, args.max_windows, bos=bos is not None)

    f32 = gguf_of_type(out, src, "F32")
    if not f32.exists():
        print(f"writing {f32}", flush=True)
        write_f32_gguf(src, f32)
    files = {"F32": (f32, 0.0)}
    for type_name in [t.strip() for t in args.types.split(",") if t.strip()]:
        target = gguf_of_type(out, src, type_name)
        seconds = quantize(llama_cpp, f32, target, type_name, args.threads)
        files[type_name] = (target, seconds)
        print(f"quantized {type_name} in {seconds:.1f} s", flush=True)

    lms = {f"llama.cpp-{t}": LlamaCppLM(llama_cpp, path, args.ctx + 1, args.threads) for t, (path, _) in files.items()}
    xfp_dir = None if args.no_xfp else xfp_default_folder(src)
    if xfp_dir is not None:
        from xfp.evaluate.generation import load_model

        lms[XFP_ROW] = load_model(xfp_dir)[0]
    scores = score_windows(ids, windows, {name: (lambda m=m: m) for name, m in lms.items()},
                           reference=lambda: reference, bos_id=bos, desc="windows x models")
    base = scores["source"]
    rows = []
    for type_name, (path, seconds) in files.items():
        name = f"llama.cpp-{type_name}"
        bits, stored, weights, types = honest_bits(path, names)
        s = scores[name]
        rows.append({"method": name, "family": "llama.cpp",
                     "about": f"llama.cpp {type_name}, no imatrix, embeddings F16 ({', '.join(f'{k} x{v}' for k, v in sorted(types.items()))})",
                     "honest_bits": bits, "stored_bytes": stored, "weights": weights, "ppl": s.ppl,
                     "delta_ppl": s.ppl - base.ppl, "kl": s.kl, "top1": s.top1, "quantize_s": seconds,
                     "eval_s": s.seconds, "garbage": None, "garbage_passed": None})
        print(f"{name:18s} {bits:6.3f} bits  ppl {s.ppl:8.3f}  KL {s.kl:.4f}  top-1 {s.top1:.3f}", flush=True)
    if xfp_dir is not None:
        s = scores[XFP_ROW]
        totals = json.loads((xfp_dir / "report.json").read_text(encoding="utf-8"))["totals"]
        rows.append({"method": XFP_ROW, "family": "xfp",
                     "about": f"the default `xfp quantize` folder ({xfp_dir.name}), run by its fused kernel",
                     "honest_bits": totals["quantized_honest_bits"], "stored_bytes": totals["quantized_bytes"],
                     "weights": totals["quantized_weights"], "ppl": s.ppl, "delta_ppl": s.ppl - base.ppl, "kl": s.kl,
                     "top1": s.top1, "quantize_s": None, "eval_s": s.seconds, "garbage": None, "garbage_passed": None})
        print(f"{XFP_ROW:18s} {totals['quantized_honest_bits']:6.3f} bits  ppl {s.ppl:8.3f}  KL {s.kl:.4f}  "
              f"top-1 {s.top1:.3f}", flush=True)
    result = {"source": str(src), "ctx": args.ctx, "windows": len(windows), "tokens": base.tokens,
              "source_ppl": base.ppl, "llama_cpp_python": llama_cpp.__version__, "rows": rows}
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / RESULT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

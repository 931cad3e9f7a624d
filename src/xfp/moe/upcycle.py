"""A real-weight test MoE: the default model's dense MLPs upcycled into a Qwen2-MoE, deterministically.

Every decoder MLP `m` (gate/up/down of SmolLM2-135M, llama architecture) becomes, in a `qwen2_moe` model
that stock transformers loads:
- a shared expert equal to `m`, behind `shared_expert_gate` = 0, so sigmoid(0) = 1/2 of it is added;
- E routed experts, each a copy of `m` with its down_proj halved, plus (`perturb` > 0) deterministic
  Gaussian noise of `perturb` times each row's RMS on every routed matrix, drawn from seed `seed`;
- a router (`mlp.gate.weight` [E, hidden]) with N(0, ROUTER_STD^2) entries, and `norm_topk_prob` on.
Routing weights then sum to 1 over the top-k experts, so with `perturb` = 0 every routing mix gives
1/2 m(x) + 1/2 m(x) = m(x): the MoE computes the dense model exactly (up to float rounding). With noise,
each expert differs a little from the others (what a quantizer sees as distinct matrices), and the model
stays close to the dense one (docs/MOE.md states how close, as perplexity).

Smaller variants keep real weights: the first `layers` decoder layers and the first `intermediate` MLP
neurons (gate/up rows, down columns) of each layer. `dense_slice` writes the same slice as a plain llama
folder, the reference the variant is compared to.

Routed experts are written per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`, as published Qwen
MoE checkpoints) or fused (`mlp.experts.gate_up_proj` [E, 2I, H], gate rows first, and
`mlp.experts.down_proj` [E, H, I], transformers 5's module layout).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from xfp.errors import SourceError
from xfp.sources.hf_folder import HFFolderSource

ROUTER_STD = 0.02
"""Standard deviation of the router's entries: enough for the top-k choice to vary from token to token."""

Layout = Literal["per_expert", "fused"]


@dataclass(frozen=True)
class UpcycleSpec:
    """What `upcycle` builds. layers / intermediate: None keeps all of the dense model's."""

    experts: int = 4
    top_k: int = 2
    layers: int | None = None
    intermediate: int | None = None
    perturb: float = 0.02
    seed: int = 0
    layout: Layout = "per_expert"

    def __post_init__(self) -> None:
        if type(self.experts) is not int or self.experts < 1:
            raise ValueError(f"experts must be an integer >= 1, got {self.experts!r}")
        if type(self.top_k) is not int or not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k must be in [1, experts={self.experts}], got {self.top_k!r}")
        for name in ("layers", "intermediate"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if not 0.0 <= self.perturb < 1.0:
            raise ValueError(f"perturb must be in [0, 1), got {self.perturb}")
        if self.layout not in ("per_expert", "fused"):
            raise ValueError(f"layout must be 'per_expert' or 'fused', got {self.layout!r}")


def _dense(src: Path, spec: UpcycleSpec) -> tuple[HFFolderSource, dict, int, int]:
    source = HFFolderSource(src)
    cfg = source.config()
    if cfg.get("model_type") != "llama":
        raise SourceError(f"{src / 'config.json'}: upcycling needs a llama model, got model_type "
                          f"{cfg.get('model_type')!r}")
    layers = cfg["num_hidden_layers"] if spec.layers is None else spec.layers
    inter = cfg["intermediate_size"] if spec.intermediate is None else spec.intermediate
    if layers > cfg["num_hidden_layers"] or inter > cfg["intermediate_size"]:
        raise SourceError(f"{src / 'config.json'}: asked for {layers} layers x {inter} MLP neurons, the model has "
                          f"{cfg['num_hidden_layers']} x {cfg['intermediate_size']}")
    return source, cfg, layers, inter


def _mlp(source: HFFolderSource, layer: int, inter: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{layer}.mlp"
    return {"gate": source.load(f"{p}.gate_proj.weight")[:inter].contiguous(),
            "up": source.load(f"{p}.up_proj.weight")[:inter].contiguous(),
            "down": source.load(f"{p}.down_proj.weight")[:, :inter].contiguous()}


def _common(source: HFFolderSource, layers: int) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and each kept layer's attention and norms, unchanged."""
    out = {}
    for name in source.tensor_names():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if layer >= layers or ".mlp." in name:
                continue
        out[name] = source.load(name)
    return out


def _noisy(w: torch.Tensor, perturb: float, gen: torch.Generator) -> torch.Tensor:
    if perturb == 0:
        return w.clone()
    rms = w.pow(2).mean(1, keepdim=True).sqrt()
    return w + perturb * rms * torch.randn(w.shape, generator=gen, dtype=torch.float32)


def moe_config(dense_cfg: dict, spec: UpcycleSpec, layers: int, inter: int) -> dict:
    """config.json of the upcycled model (a transformers Qwen2MoeConfig)."""
    from transformers import Qwen2MoeConfig

    heads = dense_cfg["num_attention_heads"]
    cfg = Qwen2MoeConfig(
        vocab_size=dense_cfg["vocab_size"], hidden_size=dense_cfg["hidden_size"], intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=dense_cfg["num_key_value_heads"],
        head_dim=dense_cfg.get("head_dim", dense_cfg["hidden_size"] // heads), hidden_act=dense_cfg["hidden_act"],
        max_position_embeddings=dense_cfg["max_position_embeddings"], rms_norm_eps=dense_cfg["rms_norm_eps"],
        tie_word_embeddings=dense_cfg.get("tie_word_embeddings", False),
        rope_parameters=dense_cfg.get("rope_parameters"), qkv_bias=False, use_sliding_window=False,
        decoder_sparse_step=1, moe_intermediate_size=inter, shared_expert_intermediate_size=inter,
        num_experts=spec.experts, num_experts_per_tok=spec.top_k, norm_topk_prob=True, mlp_only_layers=[],
        bos_token_id=dense_cfg.get("bos_token_id"), eos_token_id=dense_cfg.get("eos_token_id"),
        pad_token_id=dense_cfg.get("pad_token_id"),
    )
    d = cfg.to_dict()
    d["architectures"] = ["Qwen2MoeForCausalLM"]
    d["dtype"] = "float32"
    d["xfp_upcycled"] = {"from": dense_cfg.get("_model_name_or_path", "llama"), **spec.__dict__}
    return d


def _write_sharded(out: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    """One safetensors file per entry of `shards` plus model.safetensors.index.json."""
    weight_map = {}
    total = 0
    n = len(shards)
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def upcycle(src: str | Path, out: str | Path, spec: UpcycleSpec = UpcycleSpec()) -> Path:
    """Write the upcycled Qwen2-MoE of the llama folder `src` into the new folder `out` (see module doc)."""
    src, out = Path(src), Path(out)
    source, dense_cfg, layers, inter = _dense(src, spec)
    if out.exists() and any(out.iterdir()):
        raise SourceError(f"{out}: output folder is not empty")
    out.mkdir(parents=True, exist_ok=True)
    hidden = dense_cfg["hidden_size"]
    gen = torch.Generator().manual_seed(spec.seed)
    shards = [_common(source, layers)]
    for layer in range(layers):
        m = _mlp(source, layer, inter)
        p = f"model.layers.{layer}.mlp"
        t = {f"{p}.gate.weight": ROUTER_STD * torch.randn(spec.experts, hidden, generator=gen),
             f"{p}.shared_expert_gate.weight": torch.zeros(1, hidden),
             f"{p}.shared_expert.gate_proj.weight": m["gate"], f"{p}.shared_expert.up_proj.weight": m["up"],
             f"{p}.shared_expert.down_proj.weight": m["down"]}
        experts = [{"gate": _noisy(m["gate"], spec.perturb, gen), "up": _noisy(m["up"], spec.perturb, gen),
                    "down": _noisy(0.5 * m["down"], spec.perturb, gen)} for _ in range(spec.experts)]
        if spec.layout == "fused":
            t[f"{p}.experts.gate_up_proj"] = torch.stack([torch.cat([e["gate"], e["up"]]) for e in experts])
            t[f"{p}.experts.down_proj"] = torch.stack([e["down"] for e in experts])
        else:
            for e, ex in enumerate(experts):
                t.update({f"{p}.experts.{e}.{k}_proj.weight": ex[k] for k in ("gate", "up", "down")})
        shards.append({k: v.contiguous() for k, v in t.items()})
    _write_sharded(out, shards)
    (out / "config.json").write_text(json.dumps(moe_config(dense_cfg, spec, layers, inter), indent=2) + "\n")
    source.write_aux_files(out)
    return out


def dense_slice(src: str | Path, out: str | Path, *, layers: int | None = None, intermediate: int | None = None) -> Path:
    """The same slice of the dense llama as `upcycle(..., UpcycleSpec(layers=, intermediate=))`, as a llama folder."""
    src, out = Path(src), Path(out)
    source, cfg, layers, inter = _dense(src, UpcycleSpec(layers=layers, intermediate=intermediate))
    out.mkdir(parents=True, exist_ok=True)
    tensors = _common(source, layers)
    for layer in range(layers):
        m = _mlp(source, layer, inter)
        tensors.update({f"model.layers.{layer}.mlp.{k}_proj.weight": v for k, v in m.items()})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(num_hidden_layers=layers, intermediate_size=inter)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    source.write_aux_files(out)
    return out


def build_cached(spec: UpcycleSpec, root: str | Path | None = None) -> Path:
    """The upcycled default model for `spec`, built once under `$XFP_CACHE/moe/` (or `root`) and reused."""
    from xfp.sources import cache_dir, default_model_hf

    key = "-".join(f"{k}{v}" for k, v in spec.__dict__.items())
    folder = (Path(root) if root is not None else cache_dir() / "moe") / f"smollm2-135m-upcycled-{key}"
    if (folder / "config.json").is_file():
        return folder
    staged = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    upcycle(default_model_hf(), staged, spec)
    staged.replace(folder)
    return folder


CI_SPEC = UpcycleSpec(experts=4, top_k=2, layers=1, intermediate=128, perturb=0.02, seed=0)
"""The small variant CI quantizes end to end: the first decoder layer, its first 128 MLP neurons, 4 experts
(real weights; 19 matrices to quantize)."""

def main(argv: list[str] | None = None) -> int:
    """`python -m xfp.moe.upcycle OUT [--experts 4 --top-k 2 --layers N --intermediate N --perturb 0.02
    --seed 0 --layout per_expert|fused]`: write the upcycled default model into the new folder OUT."""
    import argparse

    from xfp.errors import XFPError
    from xfp.sources import default_model_hf

    p = argparse.ArgumentParser(prog="python -m xfp.moe.upcycle", description=main.__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--perturb", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="per_expert", choices=["per_expert", "fused"])
    p.add_argument("--ci", action="store_true", help="the small CI variant (CI_SPEC), with --layout")
    args = p.parse_args(argv)
    try:
        spec = (UpcycleSpec(**{**CI_SPEC.__dict__, "layout": args.layout}) if args.ci else
                UpcycleSpec(args.experts, args.top_k, args.layers, args.intermediate, args.perturb, args.seed, args.layout))
        print(upcycle(default_model_hf(), args.out, spec))
    except (XFPError, ValueError) as exc:
        print(f"upcycle: error: {exc}")
        return 2
    return 0


__all__ = ["CI_SPEC", "ROUTER_STD", "UpcycleSpec", "build_cached", "dense_slice", "main", "moe_config", "upcycle"]


if __name__ == "__main__":
    raise SystemExit(main())

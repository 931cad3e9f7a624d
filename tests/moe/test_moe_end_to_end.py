"""The small upcycled MoE quantized end to end: classes and floors, report, verify, load and generate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from xfp.cli import main
from xfp.errors import XFPError
from xfp.format.folder import iter_shards
from xfp.integrations.transformers import XFPConfig
from xfp.moe.runtime import XFPExperts

PROMPT = "The capital of France is"


def _report(folder):
    return json.loads((folder / "report.json").read_text())


def _rows(report, part):
    return [t for t in report["tensors"] if "bits" in t and part in t["name"]]


def test_classes_floors_and_bits(moe_xfp):
    report = _report(moe_xfp)
    routed, shared, attn = (_rows(report, p) for p in (".experts.", ".shared_expert.", ".self_attn."))
    assert len(routed) == 4 * 3 and len(shared) == 3 and len(attn) == 4
    assert {t["class"] for t in routed} == {"lazy"} and {t["class"] for t in shared + attn} == {"strict"}
    assert all(t["meets_floor"] and t["cosine"]["p1"] >= 0.97 for t in routed)
    assert all(t["meets_floor"] and t["cosine"]["p1"] >= 0.99 for t in shared + attn)
    kept = {t["name"]: t for t in report["tensors"] if "bits" not in t}
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight"):
        assert kept[name]["stored_dtype"] == "float32"  # routers stay in high precision

    def honest(rows):
        return 8 * sum(t["bytes"] for t in rows) / sum(t["shape"][0] * t["shape"][1] for t in rows)

    # the lazy floor buys routed experts fewer honest bits than attention
    assert honest(routed) < honest(attn) - 0.5
    classes = report["classes"]
    assert classes["lazy"]["matrices"] == 12 and classes["strict"]["matrices"] == 7
    assert classes["lazy"]["bytes_share"] + classes["strict"]["bytes_share"] == pytest.approx(1.0)
    stacks = {s["name"]: s for s in report["stacks"]}
    assert sorted(stacks) == [f"model.layers.0.mlp.experts.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    for s in stacks.values():
        assert s["experts"] == 4 and s["missed_floor"] == 0 and s["select"] == {"select": "expert"}
        assert s["cosine_min_over_experts"] >= 0.97
    assert "## Expert stacks" in (moe_xfp / "REPORT.md").read_text()
    qc = json.loads((moe_xfp / "config.json").read_text())["quantization_config"]
    assert qc["matrices"]["model.layers.0.mlp.experts.3.down_proj.weight"]["class"] == "lazy"


def test_verify_checks_every_expert(moe_fused_src, moe_xfp, capsys):
    stored = [n for _, content in iter_shards(moe_xfp) for n in content.matrices]
    assert sum(".experts." in n for n in stored) == 12
    # quantized from the per-expert source, verified against the fused one: same stored matrices
    assert main(["verify", str(moe_fused_src), str(moe_xfp)]) == 0
    out = capsys.readouterr().out
    assert "19 matrices checked, 0 below their floor" in out
    assert out.count(".experts.") == 12


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(300, 364).unsqueeze(0)).logits[0]


def test_load_and_generate(moe_src, moe_xfp):
    model = AutoModelForCausalLM.from_pretrained(moe_xfp).eval()
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, XFPExperts) and len(experts) == 4
    assert type(experts[2].down_proj).__name__ == "XFPLinear"
    source = AutoModelForCausalLM.from_pretrained(moe_src).eval()
    got, want = _logits(model), _logits(source)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)  # per position, one decoder layer
    assert cos.mean() > 0.99 and cos.min() > 0.97
    tokenizer = AutoTokenizer.from_pretrained(moe_xfp)
    ids = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 6


def test_quantize_on_load_reuses_the_folder(moe_src, moe_xfp, xfp_cache, monkeypatch):
    monkeypatch.setenv("XFP_CACHE", str(xfp_cache))
    before = sorted(p.name for p in (xfp_cache / "quantized").iterdir())
    model = AutoModelForCausalLM.from_pretrained(moe_src, quantization_config=XFPConfig()).eval()
    assert sorted(p.name for p in (xfp_cache / "quantized").iterdir()) == before  # nothing fitted again
    assert model.hf_quantizer.quantized_on_load
    assert isinstance(model.model.layers[0].mlp.experts, XFPExperts)
    reference = AutoModelForCausalLM.from_pretrained(moe_xfp).eval()
    assert torch.equal(_logits(model), _logits(reference))


def test_stack_select_with_one_codebook(moe_src, moe_xfp_stack, capsys):
    report = _report(moe_xfp_stack)
    for s in report["stacks"]:
        sel = s["select"]
        assert sel["select"] == "stack" and sel["sample"] == [0, 3] and sel["stack_library"]
        assert s["missed_floor"] == 0 and s["cosine_min_over_experts"] >= 0.97
        assert set(s["bits"]) == {str(sel["bits"])} | {str(b) for b in s["bits"] if int(b) > sel["bits"]}
    content = {}
    for _, shard in iter_shards(moe_xfp_stack):
        content.update(shard.matrices)
    for s in report["stacks"]:
        prefix, proj = s["name"].rsplit(".", 1)
        shared = [e for e in range(4) if e not in s["select"]["own_codebook"] and e not in s["select"]["escalated"]]
        books = [content[f"{prefix}.{e}.{proj}.weight"].library for e in shared]
        assert len(books) >= 2 and all(torch.equal(b, books[0]) for b in books)
    assert main(["verify", str(moe_src), str(moe_xfp_stack)]) == 0  # from the fused source, checked per expert
    assert "19 matrices checked, 0 below their floor" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(moe_xfp_stack).eval()
    assert isinstance(model.model.layers[0].mlp.experts, XFPExperts)
    assert torch.isfinite(_logits(model)).all()


def test_missing_expert_is_one_line_error(moe_xfp, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(moe_xfp, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["matrices"]["model.layers.0.mlp.experts.2.up_proj.weight"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(XFPError, match=r"not 'model\.layers\.0\.mlp\.experts\.2\.up_proj\.weight' \(1 of 12"):
        AutoModelForCausalLM.from_pretrained(folder)

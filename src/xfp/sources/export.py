"""Write any `TensorSource` out as a plain float32 Hugging Face folder, one tensor in memory at a time."""

from __future__ import annotations

import json
from pathlib import Path

from xfp.errors import SourceError
from xfp.sources.base import TensorSource

_ALIGN = 8  # safetensors pads the JSON header with spaces to a multiple of 8 bytes


def write_hf_folder(source: TensorSource, out_dir: Path) -> None:
    """`out_dir`/config.json (dtype float32), the tokenizer files and model.safetensors (all F32)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = source.config()
    config["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    source.write_aux_files(out_dir)
    write_f32_safetensors(source, out_dir / "model.safetensors")


def write_f32_safetensors(source: TensorSource, file: Path, names: list[str] | None = None) -> None:
    """Stream `names` (default: all) of `source` into one safetensors file as F32, loading one at a time.

    The header is known up front from the shapes, so each tensor is written as soon as it is loaded.
    """
    names = source.tensor_names() if names is None else names
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        shape = source.tensor_shape(name)
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % _ALIGN)
    with open(file, "wb") as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for name in names:
            tensor = source.load(name).contiguous()
            if tuple(tensor.shape) != source.tensor_shape(name):
                raise SourceError(f"{source.path}: tensor '{name}' loaded as {tuple(tensor.shape)}, "
                                  f"header says {source.tensor_shape(name)}")
            out.write(tensor.numpy().data)  # float32, little-endian on every platform torch supports

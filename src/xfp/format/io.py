"""Reading and writing XFP safetensors files, with every check docs/FORMAT.md demands.

A loaded file is either fully valid or refused with a one-line `FormatError` naming the file, the tensor
and the broken constraint. Writes are atomic: a temporary file in the same folder, then a rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file as _st_save

from xfp.config import FORMAT_VERSION, MAX_LIBRARY, READABLE_FORMAT_VERSIONS, SUPPORTED_BITS
from xfp.errors import FormatError
from xfp.format.pack import padding_is_zero
from xfp.format.reference import Packed, PackedV2, PackedV2a, decoded_ends_finite, kept_values
from xfp.format.spec import (
    ALL_PARTS,
    FILE_METADATA_KEY,
    META_FIELDS_BY_MODE,
    MODE_IDS,
    MODE_NAMES,
    MODE_V2,
    MODE_V2A,
    PARTS,
    V2A_PARTS,
    V2aLayout,
    V2Layout,
    file_metadata,
    tensor_name,
)


@dataclass
class XFPFile:
    """The content of one XFP safetensors file: quantized matrices by their original weight name, and the
    tensors kept as they were."""

    matrices: dict[str, Packed] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then rename tmp_path to path; the temporary file is removed on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def flatten(content: XFPFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """XFPFile -> (safetensors tensor dict, header metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, packed in content.matrices.items():
        for part, t in packed.tensors().items():
            tensors[tensor_name(name, part)] = t.contiguous()
    for name, t in content.dense.items():
        if name in tensors:
            raise ValueError(f"tensor name '{name}' is used twice")
        tensors[name] = t.contiguous()
    return tensors, file_metadata(list(content.matrices))


def save(path: Path, content: XFPFile) -> None:
    """Write one XFP safetensors file atomically."""
    tensors, metadata = flatten(content)
    atomic_write(Path(path), lambda tmp: _st_save(tensors, str(tmp), metadata=metadata))


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise FormatError(path, None, "file does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(path, None, f"not a readable safetensors file ({first})") from None


def read_matrix_names(path: Path, metadata: dict[str, str]) -> list[str]:
    """The matrices an XFP file lists in its header metadata, after checking the format version."""
    return read_header(path, metadata)[1]


def read_header(path: Path, metadata: dict[str, str]) -> tuple[int, list[str]]:
    """(format version, listed matrices) of an XFP file's header metadata; FormatError unless readable."""
    key = FILE_METADATA_KEY
    if key not in metadata:
        raise FormatError(path, None, f"header metadata key '{key}' is missing (not an XFP file)")
    try:
        info = json.loads(metadata[key])
    except json.JSONDecodeError:
        info = None
    if not isinstance(info, dict):
        raise FormatError(path, None, f"header metadata '{key}' must be a JSON object")
    version = info.get("format_version")
    if type(version) is not int or version not in READABLE_FORMAT_VERSIONS:
        raise FormatError(path, None, f"format version {version!r} is not supported (this XFP reads "
                                      f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; it writes {FORMAT_VERSION})")
    names = info.get("matrices")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FormatError(path, None, f"header metadata '{key}' must list the quantized matrices as a JSON list of names")
    return version, names


def _check(ok: bool, path: Path, tensor: str, constraint: str) -> None:
    if not ok:
        raise FormatError(path, tensor, constraint)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_meta(path: Path, name: str, parts: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The meta tensor's fields, after checking its dtype, its length for the mode, and each field."""
    meta_name = tensor_name(name, "meta")
    _check("meta" in parts, path, meta_name, "is missing")
    meta = parts["meta"]
    _check(meta.dtype == torch.int32 and meta.dim() == 1 and meta.numel() >= 1, path, meta_name,
           f"must be a 1-D int32 tensor starting with the mode, got {_dtype_name(meta.dtype)} {list(meta.shape)}")
    mode = int(meta[0])
    _check(mode in META_FIELDS_BY_MODE, path, meta_name,
           f"mode must be one of {sorted(META_FIELDS_BY_MODE)} ({', '.join(MODE_IDS)}), got {mode}")
    fields = META_FIELDS_BY_MODE[mode]
    _check(meta.numel() == len(fields), path, meta_name,
           f"must be int32 [{len(fields)}] = ({', '.join(fields)}) for mode {mode} ({MODE_NAMES[mode]}), "
           f"got {meta.numel()} entries")
    values = tuple(int(x) for x in meta.tolist())
    _, rows, cols, bits = values[:4]
    _check(rows >= 1 and cols >= 1, path, meta_name, f"rows and cols must be >= 1, got {rows}x{cols}")
    _check(bits in SUPPORTED_BITS, path, meta_name, f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if mode == MODE_V2A:
        group, library, kept = values[4:]
        _check(group >= 1, path, meta_name, f"group must be >= 1, got {group}")
        _check(1 <= library <= MAX_LIBRARY, path, meta_name, f"library must be in [1, {MAX_LIBRARY}], got {library}")
        _check(0 <= kept <= cols, path, meta_name, f"kept columns must be in [0, {cols}], got {kept}")
    return values


def _finite(path: Path, name: str, part: str, t: torch.Tensor) -> None:
    _check(bool(torch.isfinite(t).all()), path, tensor_name(name, part), "values must be finite (no NaN/Inf)")


def validate_matrix(path: Path, name: str, parts: dict[str, torch.Tensor]) -> Packed:
    """Check one matrix's stored tensors against docs/FORMAT.md -> PackedV2 or PackedV2a, or raise FormatError.

    parts: part suffix -> tensor, for every `BASE.xfp_<part>` tensor found under this matrix's base name.
    """
    values = _check_meta(path, name, parts)
    mode, rows, cols, bits = values[:4]
    allowed = V2A_PARTS if mode == MODE_V2A else PARTS
    for part in allowed:
        _check(part in parts, path, tensor_name(name, part), "is missing")
    for part in sorted(set(parts) - set(allowed)):
        _check(False, path, tensor_name(name, part), f"is not a part of a mode {mode} ({MODE_NAMES[mode]}) matrix")
    pos = parts["outlier_pos"]
    pos_name = tensor_name(name, "outlier_pos")
    _check(pos.dim() == 1, path, pos_name, f"must be 1-D, got shape {list(pos.shape)}")
    _check(pos.numel() <= rows * cols, path, pos_name, f"has {pos.numel()} entries for {rows * cols} weights")
    if mode == MODE_V2A:
        layout = V2aLayout(rows, cols, bits, pos.numel(), values[4], values[5], values[6])
    else:
        layout = V2Layout(rows, cols, bits, pos.numel())
    for part, (dtype, shape) in layout.tensors().items():
        t = parts[part]
        _check(t.dtype == dtype and tuple(t.shape) == shape, path, tensor_name(name, part),
               f"must be {_dtype_name(dtype)} {list(shape)}, got {_dtype_name(t.dtype)} {list(t.shape)}")
    _check(padding_is_zero(parts["codes"], bits, cols), path, tensor_name(name, "codes"),
           "padding bits at the end of a row must be zero")
    if pos.numel():
        _check(int(pos.min()) >= 0 and int(pos.max()) < rows * cols, path, pos_name,
               f"positions must lie in [0, {rows * cols})")
        _check(bool((pos[1:] > pos[:-1]).all()), path, pos_name, "positions must be strictly increasing (unique)")
    _finite(path, name, "outlier_val", parts["outlier_val"])
    if mode == MODE_V2:
        _check(bool(torch.isfinite(parts["codebook"]).all()), path, tensor_name(name, "codebook"),
               "entries must be finite (no NaN/Inf)")
        return PackedV2(rows, cols, bits, parts["codes"], parts["codebook"], pos, parts["outlier_val"])
    return _validate_v2a(path, name, layout, parts)


def _validate_v2a(path: Path, name: str, layout: V2aLayout, parts: dict[str, torch.Tensor]) -> PackedV2a:
    library, ids = parts["library"], parts["ids"]
    _check(bool(torch.isfinite(library).all()), path, tensor_name(name, "library"),
           "entries must be finite (no NaN/Inf)")
    scale_table, offset_table = parts["scale_table"], parts["offset_table"]
    _finite(path, name, "scale_table", scale_table)
    _check(bool((scale_table >= 0).all()), path, tensor_name(name, "scale_table"), "scales must be >= 0")
    _finite(path, name, "offset_table", offset_table)
    if layout.library > 1:
        _check(int(ids.max()) < layout.library, path, tensor_name(name, "ids"),
               f"library ids must be < {layout.library} (the library size)")
    kept = parts["kept_cols"]
    if kept.numel():
        _check(int(kept.min()) >= 0 and int(kept.max()) < layout.cols, path, tensor_name(name, "kept_cols"),
               f"columns must lie in [0, {layout.cols})")
        _check(bool((kept[1:] > kept[:-1]).all()), path, tensor_name(name, "kept_cols"),
               "columns must be strictly increasing (unique)")
        pos = parts["outlier_pos"]
        if pos.numel():
            in_kept = torch.isin(pos.long() % layout.cols, kept.long())
            _check(not bool(in_kept.any()), path, tensor_name(name, "outlier_pos"),
                   "an outlier lies in a kept column (they must be disjoint)")
    kept_val, kept_scale = parts["kept_val"], parts["kept_scale"]
    if kept_val.numel():
        _check(int(kept_val.min()) >= -127, path, tensor_name(name, "kept_val"), "values must be in [-127, 127]")
    _finite(path, name, "kept_scale", kept_scale)
    _check(bool((kept_scale >= 0).all()), path, tensor_name(name, "kept_scale"), "scales must be >= 0")
    _check(bool(torch.isfinite(kept_values(kept_val, kept_scale)).all()), path, tensor_name(name, "kept_scale"),
           "decoded values must be finite: kept_val * kept_scale overflows float16 in some column")
    packed = PackedV2a(layout.rows, layout.cols, layout.bits, layout.group, parts["codes"], library, parts["scale"],
                       scale_table, parts["offset"], offset_table, ids, parts["outlier_pos"], parts["outlier_val"],
                       kept, kept_val, kept_scale)
    _check(decoded_ends_finite(library, packed.group_scale, packed.group_offset, ids), path,
           tensor_name(name, "scale"),
           "decoded values must be finite: library entry * scale + offset overflows float16 in some group")
    return packed


def load(path: Path) -> XFPFile:
    """Read and fully validate one XFP safetensors file."""
    path = Path(path)
    with _open(path) as f:
        version, names = read_header(path, dict(f.metadata() or {}))
        keys = set(f.keys())
        owned: set[str] = set()
        out = XFPFile()
        for name in names:
            parts = {}
            for part in ALL_PARTS:
                key = tensor_name(name, part)
                if key in keys:
                    parts[part] = _get(f, path, key)
                    owned.add(key)
            meta = parts.get("meta")
            # a meta of another dtype (even float NaN) is refused by validate_matrix, with its own message
            is_v2a = (meta is not None and meta.dtype == torch.int32 and meta.numel() > 0
                      and int(meta.reshape(-1)[0]) == MODE_V2A)
            _check(version >= 3 or not is_v2a, path, tensor_name(name, "meta"),
                   f"mode v2a needs format version 3 (version 2 stored V2a scales as float16; quantize the "
                   f"source again), the file says {version}")
            packed = validate_matrix(path, name, parts)
            out.matrices[name] = packed
        for key in sorted(keys - owned):
            _check(".xfp_" not in key, path, key, "looks like part of a quantized matrix not listed in the metadata")
            t = _get(f, path, key)
            if t.is_floating_point():
                _check(bool(torch.isfinite(t).all()), path, key, "values must be finite (no NaN/Inf)")
            out.dense[key] = t
    return out


def _get(f, path: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(path, key, f"cannot be read ({first})") from None

"""transformers integration: `from_pretrained` loads XFP folders, and quantizes plain folders on load.

Importing this module registers `XFPConfig` and `XFPHfQuantizer` under `quant_method: "xfp"` with the
public `register_quantization_config` / `register_quantizer` of transformers (`import xfp` does it).

An XFP folder (config.json with `quantization_config.quant_method == "xfp"`):
- before the weights load (`_process_model_before_weight_loading`, the model is still on the meta device):
  every matrix in `quantization_config.matrices` is resolved to its `nn.Linear` or token `nn.Embedding`,
  sized from that layer's shape and the entry (mode, bits, outliers; group and library in mode v2a), checked
  against the safetensors headers (presence, dtype, shape, the `xfp` header metadata: format version and
  matrix list; no data is read), and replaced by an `XFPLinear` or `XFPEmbedding` whose buffers carry the
  stored tensor names, so transformers fills them like any other state-dict entry;
- tied weights (`tie_word_embeddings`, see `plan_ties`): when the folder stores one matrix of a tied pair
  quantized and not the other (SmolLM2, Gemma: the pipeline writes `model.embed_tokens.weight` only), the
  other layer becomes a *tied* XFP module reading the same buffers (`XFPLinear.tied`), no second copy;
  every pair with a quantized side is removed from transformers' tying, so it never re-ties a dense tensor;
- dense tensors (not quantized): each must have the shape of the model's entry of that name (a one-line
  `FormatError` otherwise, `check_dense_shapes`); a float16 token embedding and lm_head in a float32 model on
  the CPU load as `HalfEmbedding` / `HalfLinear` over the stored float16 tensor instead of a widened float32
  copy (`keep_float16_dense`, docs/RUNTIME.md);
- after (`_process_model_after_weight_loading`): each matrix's content is checked by
  `xfp.format.io.validate_matrix`, and kept floating tensors must be finite. Any violation is a one-line
  `xfp.errors.FormatError` naming the file and the tensor. A tied pair stored twice, bit-identical, keeps
  one copy.

Quantize-on-load (`from_pretrained(plain_folder, quantization_config=XFPConfig(...))`): transformers
resolves the checkpoint files before any quantizer hook can change the path, and hands that same list to
`_process_model_before_weight_loading(checkpoint_files=...)` before it reads a single weight. The hook
quantizes the source folder into `$XFP_CACHE/quantized/<key>` (key: source fingerprint + config + XFP
version; an existing folder is reused, so a second load fits nothing), puts that folder's shards into the
list in place, marks the quantizer pre-quantized, and continues exactly as for an XFP folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers import auto as _auto
from transformers.utils.quantization_config import QuantizationConfigMixin

from xfp.config import FORMAT_VERSION, MAX_LIBRARY, READABLE_FORMAT_VERSIONS, SUPPORTED_BITS, QuantConfig
from xfp.errors import FormatError, XFPError
from xfp.format import folder as xfp_folder
from xfp.format.io import read_matrix_names
from xfp.format.spec import Layout, make_layout, base_name, tensor_name
from xfp.runtime.embedding import XFPEmbedding
from xfp.runtime.half import HalfEmbedding, HalfLinear
from xfp.runtime.linear import BUFFER_PREFIX, XFPLinear
from xfp.runtime.stored import StoredMatrix, layout_kwargs
from xfp.moe.runtime import prepare_experts

log = logging.getLogger(__name__)

QUANT_METHOD = "xfp"
_QUANT_FIELDS = tuple(QuantConfig.__dataclass_fields__)
_PART_MARKER = f".{BUFFER_PREFIX}"  # every stored part's name contains ".xfp_"
_SAFETENSORS_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
                       "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
                       "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class XFPConfig(QuantizationConfigMixin):
    """`quantization_config` of an XFP model: the `QuantConfig` fields, plus what sizes each stored matrix.

    As found in an XFP folder's config.json: `{"quant_method": "xfp", "format_version": 3, <QuantConfig
    fields>, "matrices": {"model.layers.0.self_attn.q_proj.weight": {"bits": 4, "outliers": 123}, ...}}`
    (an entry may also say "mode": "v2" or "v2a"; a v2a entry adds "group", "library" and "kept", see
    `matrix_entries`).
    Passed to `from_pretrained` on a plain folder, it asks for quantize-on-load with these QuantConfig fields
    (`matrices` is then filled in from the quantized folder). `quantize_embeddings` is forwarded to the
    pipeline on quantize-on-load.
    """

    def __init__(self, *, matrices: Mapping[str, Any] | None = None, quantize_embeddings: bool = False,
                 quant_method: str = QUANT_METHOD, **fields: Any) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"XFPConfig needs quant_method {QUANT_METHOD!r}, got {quant_method!r}")
        version = fields.get("format_version", FORMAT_VERSION)
        if type(version) is not int or version not in READABLE_FORMAT_VERSIONS:
            raise FormatError("quantization_config", None,
                              f"format_version {version!r} is not supported (this XFP reads "
                              f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
        if matrices is not None and not isinstance(matrices, Mapping):
            raise ValueError(f"matrices must map weight names to {{'bits', 'outliers'}}, got {type(matrices).__name__}")
        quant = QuantConfig.from_dict(fields)  # validates; refuses unknown keys
        self.quant_method = QUANT_METHOD
        self.__dict__.update(quant.to_dict())  # floor_strict, ..., lloyd_iterations, format_version
        self.matrices = copy.deepcopy(dict(matrices or {}))
        self.quantize_embeddings = bool(quantize_embeddings)

    def quant_config(self) -> QuantConfig:
        """The QuantConfig these fields describe (re-validated, so a later `update(...)` is checked too)."""
        return QuantConfig.from_dict({k: getattr(self, k) for k in (*_QUANT_FIELDS, "format_version")})

    def __repr__(self) -> str:
        return f"XFPConfig({self.quant_config()}, {len(self.matrices)} matrices)"


@dataclass(frozen=True)
class MatrixEntry:
    """One quantization_config.matrices entry: what sizes a matrix's buffers before its data is read."""

    bits: int
    outliers: int
    mode: str = "v2"
    group: int | None = None
    library: int | None = None
    kept: int | None = None

    def layout(self, rows: int, cols: int) -> Layout:
        return make_layout(self.mode, rows, cols, self.bits, self.outliers, group=self.group, library=self.library,
                           kept=self.kept)


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, Mapping):
        return "the entry must be a JSON object"
    bits, outliers, mode = entry.get("bits"), entry.get("outliers"), entry.get("mode", "v2")
    if type(bits) is not int or type(outliers) is not int:
        return "the entry must hold integers 'bits' and 'outliers'"
    if bits not in SUPPORTED_BITS:
        return f"bits must be one of {SUPPORTED_BITS}, got {bits}"
    if outliers < 0:
        return f"outliers must be >= 0, got {outliers}"
    if mode not in ("v2", "v2a"):
        return f"mode must be 'v2' or 'v2a', got {mode!r}"
    if mode == "v2":
        if entry.get("group") is not None or entry.get("library") is not None or entry.get("kept"):
            return "'group', 'library' and 'kept' belong to mode 'v2a' entries only"
        return None
    group, library = entry.get("group"), entry.get("library")
    if type(group) is not int or group < 1:
        return f"a mode 'v2a' entry needs an integer 'group' >= 1, got {group!r}"
    if type(library) is not int or not 1 <= library <= MAX_LIBRARY:
        return f"a mode 'v2a' entry needs an integer 'library' in [1, {MAX_LIBRARY}], got {library!r}"
    kept = entry.get("kept", 0)
    if type(kept) is not int or kept < 0:
        return f"'kept' (columns kept apart in int8) must be an integer >= 0, got {kept!r}"
    return None


def matrix_entries(matrices: Mapping[str, Any], where: str | Path) -> dict[str, MatrixEntry]:
    """quantization_config.matrices -> {weight name: MatrixEntry}; FormatError on a bad entry.

    An entry is {"bits", "outliers"} plus optionally "mode" ("v2" when absent, as in version 1 folders);
    a "v2a" entry also needs "group" and "library" and may say "kept" (0 when absent). Other keys
    ("class") are ignored."""
    out = {}
    for name, entry in matrices.items():
        problem = _entry_problem(entry)
        if problem is not None:
            raise FormatError(where, name, f"quantization_config.matrices: {problem}")
        out[name] = MatrixEntry(entry["bits"], entry["outliers"], entry.get("mode", "v2"), entry.get("group"),
                                entry.get("library"), entry.get("kept"))
    return out


@dataclass(frozen=True)
class _Target:
    """One stored matrix and the model layer it becomes."""

    name: str  # stored weight name, e.g. model.layers.0.mlp.up_proj.weight
    module_path: str  # the layer in this model (differs from base_name(name) by the base-model prefix at most)
    layout: Layout


def _embedding_scale(module: nn.Embedding) -> float | None:
    """None for a plain nn.Embedding; the factor of a scaled one whose lookup XFPEmbedding reproduces; else
    ValueError naming what is not supported."""
    if module.max_norm is not None:
        raise ValueError("renormalizes its rows on lookup (max_norm), which a stored matrix cannot do")
    if type(module) is nn.Embedding:
        return None
    # Gemma's *TextScaledWordEmbedding (gemma, gemma2, gemma3, gemma3n, gemma4, t5gemma2): forward is
    # `super().forward(ids) * embed_scale.to(weight.dtype)`, embed_scale holding scalar_embed_scale.
    scale = getattr(module, "scalar_embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return float(scale)
    raise ValueError("has its own forward; XFP reproduces nn.Embedding and Gemma's scaled embeddings "
                     "(scalar_embed_scale) only")


def _module_path(model: nn.Module, name: str) -> str | None:
    """The module of stored weight `name` in `model`: its base name, with or without the base-model prefix."""
    base = base_name(name)
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [base]
    if prefix:
        candidates.append(base.removeprefix(f"{prefix}.") if base.startswith(f"{prefix}.") else f"{prefix}.{base}")
    for path in candidates:
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path
    return None


def _checkpoint_key(model: nn.Module, name: str, stored: Mapping[str, Any]) -> str | None:
    """The checkpoint's name for the model's state-dict entry `name` (with or without the base-model prefix)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    for key in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
        if key in stored:
            return key
    return None


def _find_layer(model: nn.Module, name: str, where: Path) -> tuple[str, nn.Module]:
    """The nn.Linear or nn.Embedding stored matrix `name` replaces; XFPError for any other module."""
    path = _module_path(model, name)
    if path is None:
        raise XFPError(f"{where}: quantization_config.matrices names '{name}', but {type(model).__name__} has no "
                       f"layer '{base_name(name)}'")
    module = model.get_submodule(path)
    if isinstance(module, nn.Embedding):
        try:
            _embedding_scale(module)
        except ValueError as exc:
            raise XFPError(f"{where}: '{name}' is quantized, but '{path}' is a {type(module).__name__}, which "
                           f"{exc}") from None
        return path, module
    if not isinstance(module, nn.Linear):
        raise XFPError(f"{where}: '{name}' is quantized, but '{path}' is a {type(module).__name__}; "
                       "the XFP runtime replaces torch.nn.Linear and torch.nn.Embedding layers only")
    return path, module


def _layer_shape(module: nn.Module) -> tuple[int, int]:
    """(rows, cols) of a layer's weight: Linear [out_features, in_features], Embedding [num, dim]."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.out_features, module.in_features


def resolve_targets(model: nn.Module, entries: Mapping[str, MatrixEntry], where: Path) -> list[_Target]:
    """Each stored matrix -> the Linear or Embedding it replaces, sized from that layer and its entry."""
    targets = []
    for name, entry in entries.items():
        path, layer = _find_layer(model, name, where)
        try:
            layout = entry.layout(*_layer_shape(layer))
        except ValueError as exc:
            raise FormatError(where, name, f"quantization_config.matrices: {exc}") from None
        targets.append(_Target(name, path, layout))
    return targets


@dataclass(frozen=True)
class _Tie:
    """A pair of weights transformers would tie (`all_tied_weights_keys`), at least one of them quantized.

    owner: the module path of a quantized side; partner: the other side's module path. How the partner
    loads: "view" (not in the checkpoint: a tied XFP module over the owner's buffers), "quantized" (stored
    quantized too: loads its own, shared after loading when bit-identical) or "dense" (stored dense: loads
    it, no longer tied).
    """

    keys: tuple[str, str]  # the (target, source) parameter names of the pair, as transformers lists them
    owner: str
    partner: str
    how: str


def plan_ties(model: nn.Module, targets: list[_Target], stored: Mapping[str, Any], where: Path) -> list[_Tie]:
    """The tied pairs with a quantized side, and how each partner loads (see `_Tie`).

    stored: every tensor name of the checkpoint (e.g. check_headers' first result). XFPError when a partner to
    become a view is neither an nn.Linear nor an nn.Embedding, or is not the owner's shape.
    """
    quantized = {t.module_path for t in targets}
    ties = []
    for target_key, source_key in dict(getattr(model, "all_tied_weights_keys", None) or {}).items():
        sides = [base_name(target_key), base_name(source_key)]
        if not target_key.endswith(".weight") or not source_key.endswith(".weight") or not quantized & set(sides):
            continue
        owner, partner = sides if sides[0] in quantized else sides[::-1]
        if partner in quantized:
            how = "quantized"
        elif _checkpoint_key(model, f"{partner}.weight", stored) is not None:
            how = "dense"
        else:
            how = "view"
            layer = model.get_submodule(partner)
            owner_layer = model.get_submodule(owner)
            if not isinstance(layer, (nn.Linear, nn.Embedding)):
                raise XFPError(f"{where}: '{partner}' is tied to the quantized '{owner}', but is a "
                               f"{type(layer).__name__}; a tied XFP layer is a torch.nn.Linear or torch.nn.Embedding")
            if _layer_shape(layer) != _layer_shape(owner_layer):
                raise XFPError(f"{where}: '{partner}' {list(_layer_shape(layer))} is tied to the quantized '{owner}' "
                               f"{list(_layer_shape(owner_layer))}: the shapes differ")
        ties.append(_Tie((target_key, source_key), owner, partner, how))
    return ties


def untie(model: nn.Module, keys: set[str]) -> None:
    """Remove every tied pair touching a parameter name in `keys` from transformers' tying, for loading
    (`all_tied_weights_keys`) and for a later `model.tie_weights()` (each PreTrainedModel's
    `_tied_weights_keys`, here its expanded mapping without those pairs)."""
    from transformers import PreTrainedModel

    if isinstance(getattr(model, "all_tied_weights_keys", None), dict):
        model.all_tied_weights_keys = {t: s for t, s in model.all_tied_weights_keys.items()
                                       if t not in keys and s not in keys}
    for path, module in model.named_modules():
        if not isinstance(module, PreTrainedModel):
            continue
        at = f"{path}." if path else ""
        expanded = module.get_expanded_tied_weights_keys(all_submodels=False)
        kept = {t: s for t, s in expanded.items() if f"{at}{t}" not in keys and f"{at}{s}" not in keys}
        if kept != expanded:
            module._tied_weights_keys = kept
            if path and isinstance(getattr(module, "all_tied_weights_keys", None), dict):
                module.all_tied_weights_keys = dict(kept)


def check_headers(files: list[Path], targets: list[_Target]) -> tuple[dict[str, Path], dict[str, tuple[str, list[int]]]]:
    """Check every stored part's presence, dtype and shape from the safetensors headers (no data read).

    Also every file's `xfp` header metadata (format version, matrix list). Returns ({tensor name: file} for
    every tensor of the files, {name: (safetensors dtype, shape)} of every dense tensor: not an XFP part).
    """
    expected = {tensor_name(t.name, part): (t, dtype, shape)
                for t in targets for part, (dtype, shape) in t.layout.tensors().items()}
    file_of: dict[str, Path] = {}
    dense: dict[str, tuple[str, list[int]]] = {}
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own types for truncated or corrupt headers
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FormatError(path, None, f"not a readable safetensors file ({first})") from None
        with handle as f:
            listed = set(read_matrix_names(path, dict(f.metadata() or {})))
            for key in f.keys():
                file_of[key] = path
                if _PART_MARKER not in key:
                    tensor = f.get_slice(key)
                    dense[key] = (tensor.get_dtype(), list(tensor.get_shape()))
                    continue
                if key not in expected:
                    raise FormatError(path, key, "looks like part of a quantized matrix that "
                                                 "quantization_config.matrices does not list")
                target, dtype, shape = expected[key]
                if target.name not in listed:
                    raise FormatError(path, key, f"belongs to '{target.name}', which this file's "
                                                 "'xfp' header metadata does not list")
                tensor = f.get_slice(key)
                stored_dtype = _SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype())
                stored_shape = list(tensor.get_shape())
                if stored_dtype != _dtype_name(dtype) or stored_shape != list(shape):
                    lay = target.layout
                    layout_words = ", ".join(f"{k}={v}" for k, v in lay.entry().items())
                    raise FormatError(path, key, f"must be {_dtype_name(dtype)} {list(shape)} for a "
                                                 f"{lay.rows}x{lay.cols} layer at {layout_words} "
                                                 f"(quantization_config.matrices), got {stored_dtype} {stored_shape}")
    folder = Path(files[0]).parent if files else Path(".")
    for key in expected:
        if key not in file_of:
            raise FormatError(folder, key, "is missing from the checkpoint (quantization_config.matrices lists it)")
    return file_of, dense


def _replace(model: nn.Module, target: _Target) -> StoredMatrix:
    """Put an empty (meta) XFP module in place of the target's layer; returns it."""
    layer = model.get_submodule(target.module_path)
    lay = target.layout
    if isinstance(layer, nn.Embedding):
        module = XFPEmbedding(lay.rows, lay.cols, lay.bits, lay.n_outliers, padding_idx=layer.padding_idx,
                              scale=_embedding_scale(layer), **layout_kwargs(lay), device="meta",
                              dtype=layer.weight.dtype)
    else:
        bias = layer.bias
        module = XFPLinear(lay.cols, lay.rows, lay.bits, lay.n_outliers, bias is not None, **layout_kwargs(lay),
                           device="meta", dtype=None if bias is None else bias.dtype)
    model.set_submodule(target.module_path, module)
    return module


def _tied_module(layer: nn.Module, owner: StoredMatrix) -> StoredMatrix:
    """The XFP module standing in for `layer` (nn.Linear or nn.Embedding) that reads `owner`'s matrix."""
    if isinstance(layer, StoredMatrix):  # a stored copy being replaced by a view of the owner
        if isinstance(layer, XFPEmbedding):
            return XFPEmbedding.tied(owner, dtype=layer.dtype, padding_idx=layer.padding_idx, scale=layer.scale)
        return XFPLinear.tied(owner, layer.bias)
    if isinstance(layer, nn.Embedding):
        return XFPEmbedding.tied(owner, dtype=layer.weight.dtype, padding_idx=layer.padding_idx,
                                 scale=_embedding_scale(layer))
    return XFPLinear.tied(owner, layer.bias)


def _same_matrix(a: StoredMatrix, b: StoredMatrix) -> bool:
    """Whether two modules hold the same stored matrix, bit for bit (float16 parts compared as int16)."""
    if a.layout != b.layout:
        return False
    bits = lambda t: t.view(torch.int16) if t.dtype == torch.float16 else t  # noqa: E731
    pa, pb = a.packed().tensors(), b.packed().tensors()
    return all(torch.equal(bits(pa[k]), bits(pb[k])) for k in pa)


# -- quantize-on-load -----------------------------------------------------------------------------


def cache_key(fingerprint: str, config: QuantConfig, quantize_embeddings: bool) -> str:
    """The cache folder name of one (source, config) pair; it changes with the XFP version too."""
    from xfp import __version__

    payload = {"source": fingerprint, "config": config.to_dict(), "quantize_embeddings": quantize_embeddings,
               "xfp_version": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _is_complete(folder: Path) -> bool:
    # The pipeline writes config.json last, atomically, after every shard.
    return (folder / "config.json").is_file()


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (POSIX); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def quantized_folder(src: str | Path, config: XFPConfig, *, progress: bool = True) -> Path:
    """The XFP folder of `src` under `config`: `$XFP_CACHE/quantized/<key>`, quantized first if absent.

    An interrupted run resumes from `<key>.partial`; concurrent loads of the same key wait on a lock.
    """
    from xfp.pipeline import quantize_model  # quantize-time code, imported only when quantizing
    from xfp.sources import cache_dir, open_source

    src = Path(src)
    quant = config.quant_config()
    key = cache_key(open_source(src).fingerprint(), quant, config.quantize_embeddings)
    root = cache_dir() / "quantized"
    final = root / key
    if _is_complete(final):
        log.info("XFP: %s is already quantized with this config in %s", src, final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f"{key}.lock"):
        if _is_complete(final):
            return final
        work = root / f"{key}.partial"
        if not _is_complete(work):
            log.warning("XFP: quantizing %s into %s (first load with this config; later loads reuse it)", src, final)
            with _plain_torch_defaults():
                quantize_model(src, work, quant, resume=work.exists(),
                               quantize_embeddings=config.quantize_embeddings, progress=progress)
        os.replace(work, final)
    return final


@contextmanager
def _plain_torch_defaults() -> Iterator[None]:
    """CPU as the default device and float32 as the default dtype, whatever the caller set.

    `_process_model_before_weight_loading` runs inside from_pretrained's model-init context, where new
    tensors land on the meta device in the model's dtype; quantizing there needs real tensors.
    """
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


def check_dense_shapes(model: nn.Module, dense: Mapping[str, tuple[str, list[int]]],
                       file_of: Mapping[str, Path]) -> None:
    """FormatError naming the file and tensor for a dense checkpoint tensor whose shape is not the shape of
    the model's entry of that name (an embedding of 100 rows for a config's vocab_size of 128): transformers
    would otherwise stop on it with an error that names neither. Tensors the model has no entry for are left
    to transformers (unexpected keys, or names its weight conversions map)."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = _checkpoint_key(model, name, dense)
        if key is not None and dense[key][1] != list(tensor.shape):
            raise FormatError(file_of[key], key, f"must have shape {list(tensor.shape)} for this model's config, "
                                                 f"got {dense[key][1]}")


def _on_cpu_only(device_map: Any) -> bool:
    """Whether a `from_pretrained` device_map puts every weight on the CPU (None: the CPU)."""
    if device_map is None:
        return True
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    return all(str(p) == "cpu" for p in places)


def keep_float16_dense(model: nn.Module, dense: Mapping[str, tuple[str, list[int]]]) -> list[str]:
    """Before loading: let the dense token embedding and lm_head keep their stored float16 in a float32 model.

    transformers would widen a float16-stored dense matrix to the model's float32. The input embedding (an
    nn.Embedding, or Gemma's scaled one) and the output embedding (an nn.Linear without bias) that are not
    quantized, are float32 in the model and whose checkpoint tensor is float16 (a tied lm_head: the
    embedding's) become a `HalfEmbedding` / `HalfLinear` (`xfp.runtime.half`) whose float16 buffer
    transformers fills as stored (it loads into a buffer's own dtype): no widened copy ever exists, half the
    memory, and the lm_head reads half the bytes per step. A tied pair stays tied (`HalfLinear.tied`) and
    leaves transformers' tying. dense: the checkpoint's dense tensors (check_headers' second result). Returns the
    state-dict names of the float16 buffers."""
    paths = {id(m): p for p, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = {frozenset((base_name(t), base_name(s))) for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items()}

    def stored_half(layer: nn.Module) -> bool:
        path = paths.get(id(layer))
        key = None if path is None else _checkpoint_key(model, f"{path}.weight", dense)
        return key is not None and layer.weight.dtype == torch.float32 and dense[key][0] == "F16"

    names: list[str] = []
    new_emb = None
    if isinstance(emb, nn.Embedding):
        try:
            scale = _embedding_scale(emb)
        except ValueError:  # a lookup HalfEmbedding does not reproduce: left to transformers
            emb = None
        if emb is not None and stored_half(emb):
            new_emb = HalfEmbedding(torch.empty(emb.weight.shape, dtype=torch.float16, device="meta"),
                                    dtype=torch.float32, padding_idx=emb.padding_idx, scale=scale)
            model.set_submodule(paths[id(emb)], new_emb)
            names.append(f"{paths[id(emb)]}.weight")
    if type(head) is nn.Linear and head.bias is None:
        path = paths[id(head)]
        pair = frozenset((path, paths.get(id(emb), "")))
        if new_emb is not None and pair in tied and _checkpoint_key(model, f"{path}.weight", dense) is None and \
                tuple(head.weight.shape) == tuple(new_emb.weight.shape):
            model.set_submodule(path, HalfLinear.tied(new_emb))  # stored once, as the embedding
            names.append(f"{path}.weight")
        elif stored_half(head):
            model.set_submodule(path, HalfLinear(torch.empty(head.weight.shape, dtype=torch.float16, device="meta")))
            names.append(f"{path}.weight")
    if names:
        untie(model, set(names))
    return names


# -- the quantizer --------------------------------------------------------------------------------


class XFPHfQuantizer(HfQuantizer):
    """Loads XFP folders into `XFPLinear` / `XFPEmbedding` layers; quantizes plain folders on load (see the
    module doc)."""

    requires_calibration = False
    quantization_config: XFPConfig

    def __init__(self, quantization_config: XFPConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.quantized_on_load = False
        self._targets: list[_Target] = []
        self._ties: list[_Tie] = []
        self._file_of: dict[str, Path] = {}
        self._folder: Path | None = None
        self._float16_dense: list[str] = []  # dense buffers kept float16 (keep_float16_dense)

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        if not self.pre_quantized and isinstance(device_map, dict) and "disk" in device_map.values():
            raise XFPError("XFP quantize-on-load cannot offload to disk; quantize first (`xfp quantize`) "
                           "and load the XFP folder")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        if not checkpoint_files:
            raise XFPError("XFP loads from checkpoint files (an XFP folder, or a plain Hugging Face folder to "
                           "quantize); transformers passed none (a state_dict or gguf_file cannot be used)")
        if not self.pre_quantized:
            self._quantize_on_load(checkpoint_files)
        files = [Path(f) for f in checkpoint_files]
        self._folder = files[0].parent
        entries = matrix_entries(self.quantization_config.matrices, self._folder / "config.json")
        prepare_experts(model, entries, self._folder)  # fused routed experts -> per-expert linears (xfp.moe)
        self._targets = resolve_targets(model, entries, self._folder)
        self._file_of, dense = check_headers(files, self._targets)
        self._ties = plan_ties(model, self._targets, self._file_of, self._folder)
        untie(model, {key for tie in self._ties for key in tie.keys})
        for target in self._targets:
            _replace(model, target)
        check_dense_shapes(model, dense, self._file_of)
        if _on_cpu_only(kwargs.get("device_map")):
            self._float16_dense = keep_float16_dense(model, dense)
        for tie in self._ties:
            if tie.how == "view":
                owner = model.get_submodule(tie.owner)
                model.set_submodule(tie.partner, _tied_module(model.get_submodule(tie.partner), owner))
            elif tie.how == "dense":
                log.warning("XFP: %s is tied to %s, but the checkpoint stores it dense while %s is quantized; "
                            "it loads as stored, no longer tied", tie.partner, tie.owner, tie.owner)
        return model

    def _quantize_on_load(self, checkpoint_files: list[str]) -> None:
        """Quantize (or reuse) the source folder, then load its XFP folder instead: the files list is
        the one transformers reads the weights from, so it is updated in place."""
        folder = quantized_folder(Path(checkpoint_files[0]).parent, self.quantization_config)
        self.quantization_config = copy.deepcopy(self.quantization_config)  # the caller's object stays as given
        self.quantization_config.matrices = xfp_folder.read_config(folder)["quantization_config"]["matrices"]
        checkpoint_files[:] = [str(f) for f in xfp_folder.shard_files(folder)]
        self.pre_quantized = True
        self.quantized_on_load = True

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for target in self._targets:
            module = model.get_submodule(target.module_path)
            path = self._file_of.get(tensor_name(target.name, "meta"), self._folder)
            module.validate(path, target.name)
        for tie in self._ties:
            if tie.how != "quantized":
                continue
            # both sides stored quantized: one copy when they are the same matrix, else both (as transformers
            # does with a tied pair stored with different values)
            twin_at, kept_at = base_name(tie.keys[0]), base_name(tie.keys[1])  # transformers' target, source
            kept, twin = model.get_submodule(kept_at), model.get_submodule(twin_at)
            if _same_matrix(kept, twin):
                model.set_submodule(twin_at, _tied_module(twin, kept))
                log.info("XFP: %s and %s store the same matrix: one copy kept", twin_at, kept_at)
            else:
                log.warning("XFP: %s is tied to %s, but the checkpoint stores them as different quantized matrices; "
                            "each keeps its own, no longer tied", twin_at, kept_at)
        floating = dict(model.named_parameters())
        floating.update((n, b) for n, b in model.named_buffers() if n in self._float16_dense)
        for name, param in floating.items():
            if param.is_floating_point() and param.device.type != "meta" and not bool(torch.isfinite(param).all()):
                key = _checkpoint_key(model, name, self._file_of)
                path = self._file_of[key] if key is not None else self._folder
                raise FormatError(path, name, "values must be finite (no NaN/Inf)")
        return model

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        # Stored parts load bit for bit: never cast them (e.g. by a model's keep-in-fp32 dtype plan).
        targets = getattr(converter, "_original_target_patterns", None) or []
        if any(_PART_MARKER in t for t in targets):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def is_serializable(self) -> bool:
        log.warning("An XFP model is saved by `xfp quantize` (xfp.pipeline): its output folder is the artifact; "
                    "copy or upload that folder instead of calling save_pretrained")
        return False

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """XFP modules trace as one operator each under torch.compile (xfp.runtime.opaque), so `generate` may
        compile decode steps (with a static cache and a `compile_config`)."""
        return True


def register() -> None:
    """Register quant_method "xfp" with transformers; idempotent (also across a reload of this module)."""
    for mapping, cls, register_fn in ((_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, XFPConfig, register_quantization_config),
                                      (_auto.AUTO_QUANTIZER_MAPPING, XFPHfQuantizer, register_quantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None and (current.__module__, current.__qualname__) == (cls.__module__, cls.__qualname__):
            mapping[QUANT_METHOD] = cls  # this module was re-imported: point at the new classes
            continue
        register_fn(QUANT_METHOD)(cls)  # ValueError if another package owns "xfp"


register()

__all__ = ["QUANT_METHOD", "MatrixEntry", "XFPConfig", "XFPHfQuantizer", "cache_key", "check_dense_shapes",
           "check_headers", "keep_float16_dense", "matrix_entries", "plan_ties", "quantized_folder", "register",
           "resolve_targets", "untie"]

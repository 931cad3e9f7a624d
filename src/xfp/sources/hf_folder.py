"""A Hugging Face model folder: config.json plus one or more *.safetensors files, read lazily."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from xfp.errors import FormatError, SourceError
from xfp.sources.base import FLOAT_DTYPES, TensorSource, hash_files, natural_key

INDEX_NAME = "model.safetensors.index.json"
# Files `write_aux_files` copies when present: tokenizer, generation defaults and chat templates.
AUX_PATTERNS = (
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "generation_config.json",
    "chat_template*",
)


def read_json(path: Path) -> object:
    """Parse a JSON file; SourceError naming it when it is missing or not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SourceError(f"{path}: not valid JSON ({error})") from None


def _open(file: Path) -> safe_open:
    """`safe_open` with its errors turned into one-line FormatErrors naming the file."""
    try:
        return safe_open(file, framework="pt")
    except Exception as error:  # SafetensorError, OSError: the file is unreadable or truncated
        raise FormatError(file, None, f"not a valid safetensors file ({error})") from None


def _header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{tensor: (dtype label, shape)}` from one file's header; no tensor data is read."""
    with _open(file) as handle:
        header = {}
        for name in handle.keys():
            view = handle.get_slice(name)
            header[name] = (view.get_dtype(), tuple(view.get_shape()))
        return header


class HFFolderSource(TensorSource):
    """`config.json` + `model.safetensors` or shards listed in `model.safetensors.index.json`.

    Without an index, every `*.safetensors` in the folder is read and a tensor may appear only once.
    `fingerprint()` is a full-content sha256 of config.json, the index and the weight files.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._config = read_json(self.path / "config.json")
        if not isinstance(self._config, dict) or "model_type" not in self._config:
            raise SourceError(f"{self.path / 'config.json'}: not a transformers config (no 'model_type')")
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, tuple[str, tuple[int, ...]]] = {}
        index = self.path / INDEX_NAME
        if index.exists():
            self._scan_index(index)
        else:
            self._scan_files()
        self._names = sorted(self._file_of, key=natural_key)

    def _scan_index(self, index: Path) -> None:
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SourceError(f"{index}: no 'weight_map' object")
        headers = {}
        for shard in sorted(set(weight_map.values())):
            file = self.path / shard
            if Path(shard).name != shard or not file.is_file():
                raise SourceError(f"{index}: lists shard '{shard}', which is not a file in {self.path}")
            headers[shard] = _header(file)
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise FormatError(index, name, f"listed in shard '{shard}', which does not contain it")
            self._file_of[name], self._info[name] = self.path / shard, headers[shard][name]

    def _scan_files(self) -> None:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{self.path}: no *.safetensors weight files")
        for file in files:
            for name, info in _header(file).items():
                if name in self._file_of:
                    raise FormatError(file, name, f"also stored in {self._file_of[name].name}, and there is no index")
                self._file_of[name], self._info[name] = file, info

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name, self._info)
        return self._info[name][1]

    def tensor_dtype(self, name: str) -> str:
        self._check_name(name, self._info)
        return self._info[name][0]

    def load(self, name: str) -> torch.Tensor:
        dtype = self.tensor_dtype(name)
        file = self._file_of[name]
        if dtype not in FLOAT_DTYPES:
            allowed = "/".join(sorted(FLOAT_DTYPES))
            raise SourceError(f"{file}: tensor '{name}' is {dtype}; only {allowed} load as weights")
        with _open(file) as handle:
            try:
                tensor = handle.get_tensor(name)
            except Exception as error:
                raise FormatError(file, name, f"cannot be read ({error})") from None
        return tensor.to(torch.float32, copy=True)  # never an mmap view the caller could write through

    def config(self) -> dict:
        return copy.deepcopy(self._config)

    def write_aux_files(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for pattern in AUX_PATTERNS:
            for file in sorted(self.path.glob(pattern)):
                if file.is_file():
                    shutil.copyfile(file, out_dir / file.name)

    def fingerprint(self) -> str:
        files = [self.path / "config.json"]
        if (self.path / INDEX_NAME).exists():
            files.append(self.path / INDEX_NAME)
        files += sorted(set(self._file_of.values()))
        return hash_files(self.path, files)

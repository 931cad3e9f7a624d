"""The `TensorSource` interface: a model checkpoint read one tensor at a time, and `open_source`."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable

import torch

from xfp.errors import SourceError

GGUF_MAGIC = b"GGUF"
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})  # storage labels `load` upcasts without loss


class TensorSource(ABC):
    """A checkpoint on disk. Names are transformers parameter names; nothing is loaded until asked for."""

    path: Path

    @abstractmethod
    def tensor_names(self) -> list[str]:
        """Every stored parameter, e.g. `model.layers.0.self_attn.q_proj.weight`, in `natural_key` order."""

    @abstractmethod
    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The parameter's shape as transformers holds it (torch order)."""

    @abstractmethod
    def tensor_dtype(self, name: str) -> str:
        """The storage type label: "BF16", "F32", "I64", "Q4_1", "Q6_K"..."""

    @abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """One parameter as a fresh float32 tensor of `tensor_shape(name)`; SourceError if not float data."""

    @abstractmethod
    def config(self) -> dict:
        """The transformers config.json content (model_type, architectures, ...)."""

    @abstractmethod
    def write_aux_files(self, out_dir: Path) -> None:
        """Write the tokenizer files (and generation_config.json if any) into `out_dir`; never config.json."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable hex digest of the source content (see each subclass for what it covers)."""

    def _check_name(self, name: str, known: Iterable[str]) -> None:
        if name not in known:
            raise SourceError(f"{self.path}: no tensor named '{name}'")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def natural_key(name: str) -> list[int | str]:
    """Sort key that puts `layers.2` before `layers.10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def hash_files(root: Path, files: list[Path]) -> str:
    """sha256 over (relative name, byte size, full content) of `files`, in the given order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root).as_posix()}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (what `sha256sum` prints)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def open_source(path: str | Path) -> TensorSource:
    """Open a checkpoint by content: a folder with config.json, or a file that starts with the GGUF magic."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"{path}: folder has no config.json, so it is not a Hugging Face model folder")
        from xfp.sources.hf_folder import HFFolderSource

        return HFFolderSource(path)
    if path.is_file():
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
        except OSError as error:
            raise SourceError(f"{path}: cannot be read ({error.strerror})") from None
        if magic == GGUF_MAGIC:
            from xfp.sources.gguf_file import GGUFSource

            return GGUFSource(path)
        raise SourceError(f"{path}: not a model source (neither a folder with config.json nor a GGUF file)")
    raise SourceError(f"{path}: does not exist")

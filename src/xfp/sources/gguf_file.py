"""A GGUF file (llama.cpp), seen through transformers' eyes: HF names, HF layouts, HF config.

Everything that decides a name or a value is transformers' own legacy GGUF loader
(`transformers.modeling_gguf_pytorch_utils`), so `load(name)` is bit-for-bit the parameter that
`AutoModelForCausalLM.from_pretrained(folder, gguf_file=..., dtype=torch.float32)` holds:
  - names: `get_gguf_hf_weights_map` on a meta-device model built from the GGUF's config;
  - values: `gguf.quants.dequantize`, then the architecture's `TensorProcessor` (llama: undo the
    Q/K rotary permutation; gemma2/gemma3: norms are stored as `w + 1`, stored back as `w`).
GGUF tensors transformers does not map (e.g. llama3 `rope_freqs.weight`) are not listed; a tied
`lm_head.weight` is never invented (the config says `tie_word_embeddings`).
"""

from __future__ import annotations

import copy
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from xfp.errors import FormatError, SourceError
from xfp.sources.base import GGUF_MAGIC, TensorSource, natural_key, sha256_file

# transformers processors that keep each tensor's name and shape; the others split, fuse or reshape
# tensors (MoE experts, GPT-2 Conv1D, Mamba...) and are not supported here.
_SHAPE_PRESERVING = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor", "NemotronTensorProcessor")


def _field(reader: GGUFReader, key: str) -> object:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


class GGUFSource(TensorSource):
    """One `.gguf` file, memory-mapped by `gguf.GGUFReader`; tensors are dequantized one at a time.

    `fingerprint()` is the sha256 of the file's bytes (what `sha256sum` prints).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                magic = handle.read(4)
        except OSError as error:
            raise SourceError(f"{self.path}: cannot be read ({error.strerror})") from None
        if magic != GGUF_MAGIC:
            raise FormatError(self.path, None, f"not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
        try:
            self._reader = GGUFReader(self.path)
        except Exception as error:  # gguf raises ValueError/IndexError/... on short or corrupt files
            raise FormatError(self.path, None, f"truncated or corrupt GGUF ({type(error).__name__}: {error})") from None
        self.architecture = str(_field(self._reader, "general.architecture"))
        self._tensors: dict[str, ReaderTensor] = {tensor.name: tensor for tensor in self._reader.tensors}

    # -- transformers' view of the file, computed once on first use ------------------------------

    @cached_property
    def _parsed_config(self) -> dict:
        """The config dict transformers' GGUF loader derives from the metadata (before the config class)."""
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        if self.architecture in GGUF_CONFIG_ARCHS:
            raise SourceError(
                f"{self.path}: GGUF architecture '{self.architecture}' goes through transformers' new GGUF "
                "loader, which xfp does not mirror yet"
            )
        try:
            return load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
        except (ValueError, KeyError, NotImplementedError) as error:
            raise SourceError(f"{self.path}: transformers cannot read this GGUF ({error})") from None

    @cached_property
    def _hf_config(self):
        """The `PretrainedConfig` that `AutoConfig.from_pretrained(folder, gguf_file=name)` builds."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        raw = copy.deepcopy(self._parsed_config)
        if raw.get("model_type") not in CONFIG_MAPPING:
            raise SourceError(f"{self.path}: transformers knows no model_type '{raw.get('model_type')}'")
        return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)

    @cached_property
    def _processor(self):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        config = self._parsed_config  # first: it rejects architectures transformers loads another way
        cls = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)
        if cls.__name__ not in _SHAPE_PRESERVING:
            raise SourceError(
                f"{self.path}: GGUF architecture '{self.architecture}' needs transformers' {cls.__name__}, "
                "which splits or reshapes tensors; not supported by xfp sources"
            )
        return cls(config=config)

    @cached_property
    def _gguf_name_of(self) -> dict[str, str]:
        """`{hf_name: gguf_name}` for every tensor in the file that transformers maps."""
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        processor = self._processor
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(self._hf_config)
        except ValueError as error:
            raise SourceError(f"{self.path}: no causal-LM class in transformers for this GGUF ({error})") from None
        hf_of = get_gguf_hf_weights_map(model, processor)
        return {hf_of[name]: name for name in self._tensors if name in hf_of}

    @cached_property
    def _names(self) -> list[str]:
        return sorted(self._gguf_name_of, key=natural_key)

    def _tensor(self, name: str) -> ReaderTensor:
        self._check_name(name, self._gguf_name_of)
        return self._tensors[self._gguf_name_of[name]]

    # -- TensorSource ------------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensor(name).shape))  # ggml lists dims fastest first

    def tensor_dtype(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def gguf_name(self, name: str) -> str:
        """The tensor's name inside the GGUF file, e.g. `blk.0.attn_q.weight`."""
        return self._tensor(name).name

    def load(self, name: str) -> torch.Tensor:
        tensor = self._tensor(name)
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise SourceError(
                f"{self.path}: tensor '{name}' ({tensor.name}) is stored as {tensor.tensor_type.name}, "
                "which gguf cannot dequantize to float"
            ) from None
        values = self._processor.process(weights=values, name=tensor.name).weights
        values = np.array(values, dtype=np.float32, copy=True)  # a float32 values copy, never the mmap
        return torch.from_numpy(values.reshape(self.tensor_shape(name)))

    def config(self) -> dict:
        """`AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()`, minus the local `_name_or_path`,
        with `architectures` filled from transformers' causal-LM mapping (the GGUF path leaves it None)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config = self._hf_config.to_dict()
        config.pop("_name_or_path", None)
        if not config.get("architectures") and config["model_type"] in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
        return config

    def write_aux_files(self, out_dir: Path) -> None:
        """The tokenizer transformers builds from the GGUF vocabulary, saved with `save_pretrained`.

        A GGUF has no generation_config.json; transformers derives one from the config on load.
        """
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(self.path.parent), gguf_file=self.path.name, local_files_only=True
            )
        except (ValueError, KeyError, OSError) as error:
            raise SourceError(f"{self.path}: transformers cannot build a tokenizer from this GGUF ({error})") from None
        tokenizer.save_pretrained(str(out_dir))

    def fingerprint(self) -> str:
        return sha256_file(self.path)

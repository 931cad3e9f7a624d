"""An XFP output folder: config.json with its quantization_config, and the safetensors shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from xfp.config import READABLE_FORMAT_VERSIONS, QuantConfig
from xfp.errors import FormatError
from xfp.format import io


def read_config(folder: Path) -> dict:
    """config.json of an XFP folder; FormatError unless it holds an XFP quantization_config."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(path, None, "is missing (not an XFP output folder)") from None
    except (OSError, ValueError) as exc:
        raise FormatError(path, None, f"is not valid JSON ({exc})") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "xfp":
        raise FormatError(path, None, "has no quantization_config with quant_method 'xfp'")
    version = qc.get("format_version")
    if type(version) is not int or version not in READABLE_FORMAT_VERSIONS:
        raise FormatError(path, None, f"format_version {version!r} is not supported "
                                      f"(this XFP reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
    if not isinstance(qc.get("matrices"), dict):
        raise FormatError(path, None, "quantization_config.matrices must map weight names to their layout")
    return config


def quant_config(config: dict) -> QuantConfig:
    """The QuantConfig stored in a config.json's quantization_config."""
    qc = {k: v for k, v in config["quantization_config"].items() if k != "matrices"}
    return QuantConfig.from_dict(qc)


def shard_files(folder: Path) -> list[Path]:
    """The shards named by model.safetensors.index.json, or the single model.safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(index, None, f"is not a valid safetensors index ({exc})") from None
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FormatError(folder, None, "holds neither model.safetensors nor model.safetensors.index.json")
    return [single]


def iter_shards(folder: Path) -> Iterator[tuple[Path, io.XFPFile]]:
    """Each shard, loaded and validated, one at a time."""
    for path in shard_files(folder):
        yield path, io.load(path)

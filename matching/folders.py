"""Model folders as Hugging Face transformers' ``save_pretrained`` writes them.

A folder holds ``config.json`` and the weights: ``model.safetensors``, or shards ``model-0000k-of-0000n.safetensors``
listed in ``model.safetensors.index.json`` (its ``weight_map`` maps each tensor to its file); older folders hold
``pytorch_model.bin`` (or its shards and ``pytorch_model.bin.index.json``), read only through
``torch.load(weights_only=True)``. Other files (tokenizer, README, ``training_args.bin``) are not weights and
are left out.

A ``FolderLayout`` is what it takes to write a folder back the way it came: the JSON files kept (``config.json``,
``generation_config.json``) and the shards with the tensors each holds. Outputs are safetensors (``pytorch_model*.bin``
shards become ``model*.safetensors`` ones) with each tensor in the dtype it is given; a sharded folder gets its index.
The service stores a folder as one safetensors file whose metadata holds its layout (``normalise``), so that every
part of it that reads checkpoints reads that file as it reads any other.
"""

from __future__ import annotations

import json
import math
import os
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from matching.checkpoints import (TORCH_TO_SAFETENSORS, is_safetensors, map_safetensors, read_pytorch_state_dict,
                                  tensor_layout, write_safetensors_from)
from matching.errors import MatchingError

CONFIG = "config.json"
KEPT_FILES = (CONFIG, "generation_config.json")
MAX_JSON_BYTES = 8 * 1024**2
# (single file, index of shards), most preferred first (as transformers prefers safetensors)
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))
FOLDER_FORMAT = "hf-folder"  # a stored checkpoint's format when it was uploaded as a model folder
METADATA_KEY = "rebasin.folder"  # the layout, in the __metadata__ of the stored (normalised) safetensors file
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers writes, and checks when it loads


@dataclass
class FolderLayout:
    files: dict[str, str]  # JSON files kept as they are: name -> text, config.json first
    shards: dict[str, list[str]]  # output safetensors file -> the tensors it holds, in order

    @property
    def config(self) -> dict:
        return json.loads(self.files[CONFIG])

    def to_json(self) -> str:
        return json.dumps({"files": self.files, "shards": self.shards}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FolderLayout:
        try:
            raw = json.loads(text)
            files, shards = dict(raw["files"]), {str(k): [str(n) for n in v] for k, v in raw["shards"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise MatchingError("the stored folder layout is damaged") from None
        if CONFIG not in files or not shards:
            raise MatchingError("the stored folder layout is damaged")
        return cls(files, shards)


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _read_json(path: Path) -> tuple[str, object]:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise MatchingError(f"{path.name} is larger than {MAX_JSON_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
        return text, json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise MatchingError(f"{path.name} is not valid JSON ({str(error)[:200]})") from None


class ModelFolder:
    """An opened model folder: its layout, each tensor's dtype and shape, and the tensors read one at a time."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        try:
            self._open(path)
        except MatchingError as error:
            raise MatchingError(f"{path}: {error}") from None
        except OSError as error:
            raise MatchingError(f"{path}: {error.strerror or error}") from None

    def _open(self, path: Path) -> None:
        if not path.is_dir():
            raise MatchingError("not a directory")
        files = {}
        for name in KEPT_FILES:
            if not (path / name).is_file():
                continue
            text, value = _read_json(path / name)
            if not isinstance(value, dict):
                raise MatchingError(f"{name} must hold a JSON object")
            files[name] = text
        if CONFIG not in files:
            raise MatchingError("no config.json: a model folder is config.json and its weights, as save_pretrained writes them")
        sources = self._weight_sources(path)
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._where: dict[str, dict] = {}  # tensor -> the (memory-mapped or loaded) state dict of its file
        shards: dict[str, list[str]] = {}
        for source, listed in sources.items():
            names = self._read_source(path / source)
            if listed is not None and set(listed) != set(names):
                odd = sorted(set(listed) ^ set(names))
                raise MatchingError(f"the index does not list the tensors {source} holds (e.g. {odd[:3]})")
            shards[source.replace("pytorch_model", "model", 1).removesuffix(".bin").removesuffix(".safetensors")
                   + ".safetensors"] = names
        if not self.tensors:
            raise MatchingError("the weights hold no tensors")
        self.layout = FolderLayout(files, shards)

    @staticmethod
    def _weight_sources(path: Path) -> dict[str, list[str] | None]:
        """Weight file -> the tensors the index lists in it (None: a single file, no index)."""
        for single, index in WEIGHT_FILES:
            if (path / index).is_file():
                _, raw = _read_json(path / index)
                weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
                if not isinstance(weight_map, dict) or not weight_map:
                    raise MatchingError(f"{index} has no weight_map")
                sources: dict[str, list[str]] = {}
                for tensor, file in weight_map.items():
                    if not _plain_name(file) or not (path / file).is_file():
                        raise MatchingError(f"{index} names a shard {str(file)[:100]!r} that is not a file in the folder")
                    sources.setdefault(file, []).append(tensor)
                return dict(sorted(sources.items()))
            if (path / single).is_file():
                return {single: None}
        raise MatchingError("no weights: expected model.safetensors, or model-0000k-of-0000n.safetensors shards with "
                            "model.safetensors.index.json (or pytorch_model.bin)")

    def _read_source(self, file: Path) -> list[str]:
        if file.name.endswith(".safetensors"):
            if not is_safetensors(file):
                raise MatchingError(f"{file.name} is not a safetensors file")
            try:
                handle = map_safetensors(file)  # file-backed views: read when used
            except KeyError as error:
                raise MatchingError(f"{file.name}: unsupported dtype {error}") from None
            except Exception as error:
                raise MatchingError(f"{file.name} is not a valid safetensors file ({str(error)[:200]})") from None
            names = list(handle)
            layout = {n: (t.dtype, tuple(t.shape)) for n, t in handle.items()}
        else:
            try:
                handle = read_pytorch_state_dict(file)
            except MatchingError as error:
                raise MatchingError(f"{file.name}: {error}") from None
            names = list(handle)
            layout = {n: (t.dtype, tuple(t.shape)) for n, t in handle.items()}
        for name, (dtype, shape) in layout.items():
            if name in self.tensors:
                raise MatchingError(f"tensor {name!r} is in two weight files")
            if dtype not in TORCH_TO_SAFETENSORS:
                raise MatchingError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
            self.tensors[name] = (dtype, shape)
            self._where[name] = handle
        return names

    def get(self, name: str) -> torch.Tensor:
        return self._where[name][name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in self.tensors}

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors.values())


def is_model_folder(path: str | Path) -> bool:
    return Path(path).is_dir()


def load_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], FolderLayout]:
    """A model folder's tensors (as one state dict) and its layout."""
    folder = ModelFolder(path)
    return folder.state_dict(), folder.layout


def normalise(folder: ModelFolder, out: str | Path) -> None:
    """The folder as one safetensors file, tensors copied one at a time, its layout in the metadata."""
    write_safetensors_from(folder.tensors, folder.get, out, {**SAFETENSORS_METADATA, METADATA_KEY: folder.layout.to_json()})


def stored_layout(metadata: Mapping[str, str] | None) -> FolderLayout | None:
    """The layout in a stored checkpoint's safetensors metadata; None for a checkpoint that was not a folder."""
    text = (metadata or {}).get(METADATA_KEY)
    return None if text is None else FolderLayout.from_json(text)


def read_stored_layout(path: str | Path) -> FolderLayout | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return stored_layout(handle.metadata())


def _write_files(state: Mapping[str, torch.Tensor], layout: FolderLayout, out_dir: Path):
    """Yield each file of the folder once it is written (so that a caller may move it away at once)."""
    missing = [n for names in layout.shards.values() for n in names if n not in state]
    if missing:
        raise MatchingError(f"the folder's tensors are missing {missing[:3]}")
    for name, text in layout.files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        yield out_dir / name
    yield from write_shards(state, layout.shards, out_dir)


def write_shards(state: Mapping[str, torch.Tensor], shards: dict[str, list[str]], out_dir: Path,
                 index_name: str = "model.safetensors.index.json"):
    """Write each shard (file -> its tensors) one tensor at a time, then the index when there are several;
    yield each file once it is written."""
    weight_map, total_size = {}, 0
    for shard, names in shards.items():
        shapes = tensor_layout(state, names)
        write_safetensors_from(shapes, state.__getitem__, out_dir / shard, SAFETENSORS_METADATA)
        for n, (dtype, shape) in shapes.items():
            weight_map[n] = shard
            total_size += math.prod(shape) * dtype.itemsize
        yield out_dir / shard
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / index_name).write_text(json.dumps(index, indent=2) + "\n")
        yield out_dir / index_name


def shard_plan(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_bytes: int, stem: str = "model") -> dict[str, list[str]]:
    """Tensors (name -> dtype, shape) in order into shards of at most ``max_bytes`` (a larger tensor alone), named
    as save_pretrained names them: ``{stem}-0000k-of-0000n.safetensors``, or ``{stem}.safetensors`` for one."""
    groups, size = [[]], 0
    for name, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {f"{stem}.safetensors": groups[0]}
    return {f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors": names for i, names in enumerate(groups, 1)}


def write_folder(state: Mapping[str, torch.Tensor], layout: FolderLayout, out_dir: str | Path) -> Path:
    """Write ``state`` as a model folder laid out as ``layout`` (same files, shards and tensor order)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for _ in _write_files(state, layout, out_dir):
        pass
    return out_dir


def write_folder_tar(state: Mapping[str, torch.Tensor], layout: FolderLayout, tar_path: str | Path) -> Path:
    """The folder as an uncompressed tar whose members lie in one top folder named after the tar (``merged.tar``
    holds ``merged/config.json`` ...). Each file goes into the tar as soon as it is written and is then removed:
    the scratch disk holds the tar and one shard."""
    tar_path = Path(tar_path)
    top = tar_path.name.removesuffix(".tar")

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:  # the same bytes for the same folder
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tempfile.TemporaryDirectory(dir=tar_path.parent) as scratch, tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in _write_files(state, layout, Path(scratch)):
            tar.add(path, arcname=f"{top}/{path.name}", filter=plain)
            os.unlink(path)
    return tar_path

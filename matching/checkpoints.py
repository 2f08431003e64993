"""Reading a checkpoint file, the one way both ``rebasin merge`` and the service's upload do it.

safetensors, or a PyTorch state dict saved with ``torch.save`` and read only through
``torch.load(weights_only=True)``, also when training code wrapped it (``{"state_dict": ..., "epoch": 3}``).
Archives whose loaders unpickle arbitrary objects (TorchScript, ``torch.export``) are refused unread.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from matching.errors import MatchingError

PICKLE_PROTOCOL_MARKERS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model")
TORCH_TO_SAFETENSORS = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.int32: "I32", torch.uint32: "U32", torch.int64: "I64", torch.uint64: "U64",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


def is_safetensors(path: str | Path) -> bool:
    """By content, not name: an 8-byte header length, then the JSON header."""
    with open(path, "rb") as handle:
        prefix = handle.read(9)
    return len(prefix) == 9 and prefix[8:9] == b"{"


def _refuse_unsafe_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise MatchingError("the file is a damaged zip archive") from None
    if any(n.rsplit("/", 1)[-1] == "archive_format" for n in names):
        raise MatchingError("torch.export archives are not accepted: upload a state dict (safetensors preferred)")
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        raise MatchingError("TorchScript archives are not accepted: upload model.state_dict() (safetensors preferred)")


def state_dict_from(obj) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping in what ``torch.load`` returned, unwrapping a training checkpoint."""
    if isinstance(obj, dict) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in STATE_DICT_WRAPPERS:
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise MatchingError("the PyTorch file is not a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise MatchingError(f"the PyTorch file holds non-tensor entries, e.g. {bad[0]!r}: save model.state_dict()")
    for name, tensor in obj.items():
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise MatchingError(f"tensor {name!r} is sparse or quantized: save dense tensors")
    return obj


def read_pytorch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``torch.save`` state dict, loaded with ``weights_only=True`` (zip files memory-mapped)."""
    path = Path(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic.startswith(b"PK"):
        _refuse_unsafe_zip(path)
    elif magic[:2] not in PICKLE_PROTOCOL_MARKERS:
        raise MatchingError("unknown file format: use safetensors or a torch.save state dict (.pt/.pth/.bin)")
    try:
        # mmap (zip format only) keeps tensor data on disk until it is used.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=magic.startswith(b"PK"))
    except Exception as error:  # weights_only refuses any global it does not know, without running it
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MatchingError(f"refused to load the PyTorch file safely: {first_line[:300]}") from None
    return state_dict_from(obj)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A local checkpoint file as a state dict; MatchingError (naming the file) when it cannot be one."""
    path = Path(path)
    try:
        if not path.is_file():
            raise MatchingError("no such file")
        if path.stat().st_size == 0:
            raise MatchingError("the file is empty")
        if not is_safetensors(path):
            return read_pytorch_state_dict(path)
        try:
            state = map_safetensors(path)
        except Exception as error:
            raise MatchingError(f"not a valid safetensors file ({str(error).splitlines()[0][:200]})") from None
        if not state:
            raise MatchingError("the file holds no tensors")
        return state
    except MatchingError as error:
        raise MatchingError(f"{path}: {error}") from None
    except OSError as error:
        raise MatchingError(f"{path}: {error.strerror or error}") from None


def map_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as views of a private memory map of the file: nothing is read until a tensor
    is used, and what is read stays page cache (file-backed, reclaimable), not the process's anonymous memory.
    safetensors' own ``safe_open`` checks the header first; a tensor whose offset its dtype cannot be aligned
    to is copied."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:  # validates the header and the offsets
        names = list(handle.keys())
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if names else None
    start = 8 + header_size
    state = {}
    for name in names:
        entry = header[name]
        dtype = _SAFETENSORS_TO_TORCH[entry["dtype"]]
        begin, end = entry["data_offsets"]
        size = torch.empty((), dtype=dtype).element_size()
        if end == begin:
            state[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        tensor = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // size, offset=start + begin)
        state[name] = (tensor if (start + begin) % size == 0 else tensor.clone()).reshape(entry["shape"])
    return state


def tensor_layout(state: Mapping[str, torch.Tensor], names=None) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of ``names`` (default: all), without computing them when ``state`` is lazy (it
    then says what it holds in its ``layout``, as ``matching.merge.LazyState`` does)."""
    names = list(state) if names is None else names
    known = getattr(state, "layout", None)
    if known is not None:
        return {n: known[n] for n in names}
    return {n: (state[n].dtype, tuple(state[n].shape)) for n in names}


def write_safetensors(state: Mapping[str, torch.Tensor], out: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time (safetensors' own save builds the whole file in memory)."""
    write_safetensors_from(tensor_layout(state), state.__getitem__, out, metadata)


def write_safetensors_from(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], get: Callable[[str], torch.Tensor],
                           out: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the tensors ``layout`` names (dtype, shape), asking ``get(name)`` for each one only when its bytes are
    written: at most one tensor is in memory (the caller may read them lazily, e.g. from ``safe_open``)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in layout.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so tensor data starts aligned
    with open(out, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, (dtype, shape) in layout.items():
            tensor = get(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise MatchingError(f"tensor {name!r} changed while it was written")
            # Contiguous copies also break memory shared between tensors (tied weights).
            if tensor.numel():
                handle.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


_SAFETENSORS_TO_TORCH = {v: k for k, v in TORCH_TO_SAFETENSORS.items()}

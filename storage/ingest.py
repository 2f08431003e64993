"""Validation of untrusted checkpoint and dataset files, before any record exists.

Accepted: safetensors, and PyTorch state dicts saved with ``torch.save``, which
are read only through ``torch.load(weights_only=True)`` and converted to
safetensors. Anything whose loader would unpickle arbitrary objects
(TorchScript, ``torch.export`` archives, plain pickles) is refused unread.
"""

import json
import math
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 100_000
SAFETENSORS_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
PICKLE_PROTOCOL_MARKERS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class IngestError(ValueError):
    """An upload that cannot be accepted; the message says why in the user's terms."""


@dataclass
class TensorFileInfo:
    format: str
    path: Path  # the safetensors file to store (the upload itself, or its conversion)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())


def read_safetensors_header(path: Path) -> dict:
    """Parse and bound-check a safetensors header without trusting any of it."""
    size = path.stat().st_size
    if size == 0:
        raise IngestError("the file is empty")
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise IngestError("the file is too short to be safetensors")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len == 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise IngestError("not a safetensors file (header length is out of bounds)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IngestError(f"not a safetensors file (header is not JSON: {error})") from None
    if not isinstance(header, dict):
        raise IngestError("not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise IngestError(f"too many tensors ({len(header)} > {MAX_TENSORS})")
    data_len = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise IngestError(f"tensor {name!r}: malformed safetensors entry") from None
        if dtype not in SAFETENSORS_DTYPE_SIZES:
            raise IngestError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise IngestError(f"tensor {name!r}: invalid shape {shape!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise IngestError(f"tensor {name!r}: data offsets outside the file")
        if end - begin != math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]:
            raise IngestError(f"tensor {name!r}: byte length does not match shape and dtype")
        spans.append((begin, end))
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise IngestError("tensor data overlaps or leaves gaps: the file is corrupt")
        covered = end
    if covered != data_len:
        raise IngestError("trailing bytes after the tensor data: the file is corrupt")
    return header


def inspect_safetensors(path: Path, fmt: str = "safetensors") -> TensorFileInfo:
    header = read_safetensors_header(path)
    if not header:
        raise IngestError("the file holds no tensors")
    info = TensorFileInfo(format=fmt, path=path)
    # One tensor in memory at a time: files may be far larger than RAM.
    with safe_open(str(path), framework="pt", device="cpu") as reader:
        for name in reader.keys():
            tensor = reader.get_tensor(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise IngestError(f"tensor {name!r} holds NaN or Inf values")
            info.shapes[name] = tuple(tensor.shape)
            info.dtypes[name] = header[name]["dtype"]
    return info


def _refuse_unsafe_zip(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(n.rsplit("/", 1)[-1] == "archive_format" for n in names):
        raise IngestError("torch.export archives are not accepted: upload a state dict (safetensors preferred)")
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        raise IngestError("TorchScript archives are not accepted: upload model.state_dict() (safetensors preferred)")


def _state_dict_from(obj) -> dict[str, torch.Tensor]:
    # Training checkpoints often wrap the weights: {"state_dict": {...}} or {"model": {...}}.
    if isinstance(obj, dict) and len(obj) >= 1 and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise IngestError("the PyTorch file is not a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise IngestError(f"the PyTorch file holds non-tensor entries, e.g. {bad[0]!r}: save model.state_dict()")
    return obj


def convert_pytorch(path: Path, out: Path) -> TensorFileInfo:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic.startswith(b"PK"):
        try:
            _refuse_unsafe_zip(path)
        except zipfile.BadZipFile:
            raise IngestError("the file is a damaged zip archive") from None
    elif magic[:2] not in PICKLE_PROTOCOL_MARKERS:
        raise IngestError("unknown file format: upload safetensors or a torch.save state dict (.pt/.pth/.bin)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses any global it does not know, without running it
        raise IngestError(f"refused to load the PyTorch file safely: {str(error).splitlines()[0][:300]}") from None
    state = _state_dict_from(obj)
    # safetensors refuses tensors that share memory; contiguous copies break the sharing.
    save_file({name: tensor.detach().contiguous().clone() for name, tensor in state.items()}, str(out))
    return inspect_safetensors(out, fmt="pytorch")


def inspect_upload(path: Path, converted: Path) -> TensorFileInfo:
    """Validate an uploaded file; PyTorch files are converted into ``converted``."""
    if path.stat().st_size == 0:
        raise IngestError("the file is empty")
    with open(path, "rb") as handle:
        prefix = handle.read(9)
    if len(prefix) >= 9 and prefix[8:9] == b"{":
        return inspect_safetensors(path)
    return convert_pytorch(path, converted)


def check_dataset(info: TensorFileInfo) -> int:
    """Dataset layout per the contract; returns the number of training examples."""

    def split(inputs: str, targets: str) -> int:
        if inputs not in info.shapes or targets not in info.shapes:
            raise IngestError(f"a dataset needs both {inputs!r} and {targets!r} tensors")
        if info.dtypes[inputs] not in ("F16", "BF16", "F32", "F64"):
            raise IngestError(f"{inputs!r} must be floating point, not {info.dtypes[inputs]}")
        if info.dtypes[targets] != "I64" or len(info.shapes[targets]) != 1:
            raise IngestError(f"{targets!r} must be int64 class labels of shape [N]")
        if not info.shapes[inputs] or info.shapes[inputs][0] != info.shapes[targets][0]:
            raise IngestError(f"{inputs!r} and {targets!r} must have the same number of examples (first axis)")
        if info.shapes[targets][0] == 0:
            raise IngestError(f"{targets!r} holds no examples")
        return info.shapes[targets][0]

    num_examples = split("inputs", "targets")
    if "eval_inputs" in info.shapes or "eval_targets" in info.shapes:
        split("eval_inputs", "eval_targets")
        if info.shapes["eval_inputs"][1:] != info.shapes["inputs"][1:]:
            raise IngestError("'eval_inputs' must have the same per-example shape as 'inputs'")
    return num_examples

"""Validation of untrusted checkpoint and dataset files, before any record exists.

Accepted: safetensors, and PyTorch state dicts saved with ``torch.save``, which
are read only through ``torch.load(weights_only=True)`` and converted to
safetensors. Anything whose loader would unpickle arbitrary objects
(TorchScript, ``torch.export`` archives, plain pickles) is refused unread.
"""

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy
import torch
from safetensors import safe_open

from matching.checkpoints import TORCH_TO_SAFETENSORS, is_safetensors, read_pytorch_state_dict, write_safetensors  # noqa: F401
from matching.errors import MatchingError

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 100_000
MAX_DIMS = 32
MAX_NAME_CHARS = 1024
# Finiteness is checked on fixed-size slices of the file, so memory does not grow with tensor size.
CHECK_CHUNK_BYTES = 8 * 1024 * 1024
SAFETENSORS_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
NUMPY_FLOAT_DTYPES = {"F16": numpy.dtype("<f2"), "F32": numpy.dtype("<f4"), "F64": numpy.dtype("<f8")}


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
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise IngestError(f"not a safetensors file (header is not JSON: {error})") from None
    if not isinstance(header, dict):
        raise IngestError("not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise IngestError("safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise IngestError(f"too many tensors ({len(header)} > {MAX_TENSORS})")
    data_len = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise IngestError(f"tensor {name!r}: malformed safetensors entry") from None
        if not name or len(name) > MAX_NAME_CHARS:
            raise IngestError(f"tensor name {name[:80]!r} is empty or longer than {MAX_NAME_CHARS} characters")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_SIZES:
            raise IngestError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
            raise IngestError(f"tensor {name!r}: invalid shape {shape!r}")
        if not (_is_count(begin) and _is_count(end) and begin <= end <= data_len):
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


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise IngestError("not a safetensors file (a name appears twice in the header)")
    return dict(pairs)


def _is_count(value) -> bool:
    # JSON true/false parse as bool, which Python counts as int.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_finite(handle, name: str, dtype: str, start: int, length: int, buffer: bytearray) -> None:
    """Read one tensor's bytes in fixed-size slices and refuse NaN/Inf; memory stays at one slice."""
    torch_dtype = FLOAT_DTYPES[dtype]
    handle.seek(start)
    remaining = length
    view = memoryview(buffer)
    while remaining:
        count = handle.readinto(view[: min(remaining, len(buffer))])
        if not count:
            raise IngestError("the file ended early: it is truncated")
        remaining -= count
        if dtype in NUMPY_FLOAT_DTYPES:
            # numpy's isfinite is vectorised and far faster than torch's on CPU: the upload path's hot loop.
            finite = bool(numpy.isfinite(numpy.frombuffer(view[:count], NUMPY_FLOAT_DTYPES[dtype])).all())
        else:
            values = torch.frombuffer(view[:count], dtype=torch_dtype)
            if values.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                values = values.to(torch.float16)  # isfinite has no float8 kernels; float16 holds every value
            finite = bool(torch.isfinite(values).all())
        if not finite:
            raise IngestError(f"tensor {name!r} holds NaN or Inf values")


def inspect_safetensors(path: Path, fmt: str = "safetensors") -> TensorFileInfo:
    header = read_safetensors_header(path)
    if not header:
        raise IngestError("the file holds no tensors")
    try:
        # The reference parser must agree with ours (it maps the file, reading no tensor data here).
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            if set(reader.keys()) != set(header):
                raise IngestError("the safetensors header is inconsistent")
    except IngestError:
        raise
    except Exception as error:
        raise IngestError(f"not a valid safetensors file: {str(error)[:300]}") from None
    info = TensorFileInfo(format=fmt, path=path)
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        data_start = 8 + header_len
        # Every slice is a whole number of elements (8 divides the chunk size, item sizes divide 8).
        buffer = bytearray(CHECK_CHUNK_BYTES)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            if entry["dtype"] in FLOAT_DTYPES and end > begin:
                _check_finite(handle, name, entry["dtype"], data_start + begin, end - begin, buffer)
            info.shapes[name] = tuple(entry["shape"])
            info.dtypes[name] = entry["dtype"]
    return info


def convert_pytorch(path: Path, out: Path) -> TensorFileInfo:
    try:
        state = read_pytorch_state_dict(path)
    except MatchingError as error:
        raise IngestError(str(error)) from None
    for name, tensor in state.items():
        if tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise IngestError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold")
    write_safetensors(state, out)
    del state
    return inspect_safetensors(out, fmt="pytorch")


def inspect_upload(path: Path, converted: Path, folders=None) -> TensorFileInfo:
    """Validate an uploaded file; PyTorch files are converted into ``converted``. With ``folders`` (the
    ``ArchiveLimits`` to unpack by), an archive of a model folder is accepted too and stored as one safetensors
    file holding its layout (format ``hf-folder``, see matching.folders)."""
    if path.stat().st_size == 0:
        raise IngestError("the file is empty")
    if is_safetensors(path):
        return inspect_safetensors(path)
    from storage.archives import archive_kind

    kind = archive_kind(path)
    if kind is not None:
        if folders is None:
            raise IngestError(f"a {kind} archive is not accepted here: send one safetensors file")
        return convert_folder(path, kind, converted, folders)
    return convert_pytorch(path, converted)


def convert_folder(path: Path, kind: str, converted: Path, limits) -> TensorFileInfo:
    """Unpack a model folder's archive next to ``converted``, check it, and write it as one safetensors file."""
    from matching.folders import FOLDER_FORMAT, ModelFolder, normalise
    from storage.archives import remove_tree, unpack_folder

    unpacked = converted.parent / "folder"
    try:
        root = unpack_folder(path, unpacked, kind, limits)
        try:
            folder = ModelFolder(root)
        except MatchingError as error:
            raise IngestError(str(error).removeprefix(f"{root}: ")) from None
        normalise(folder, converted)
        del folder
    finally:
        remove_tree(unpacked)  # the unpacked copy is not needed once the normalised file is written
    return inspect_safetensors(converted, fmt=FOLDER_FORMAT)


def stored_folder_config(handle) -> dict:
    """The config.json of a checkpoint stored as a model folder, from the header of its stored file (an open,
    readable object): a job's checks need no more than that."""
    from matching.folders import stored_layout

    (header_len,) = struct.unpack("<Q", handle.read(8))
    if header_len > MAX_HEADER_BYTES:
        raise IngestError("the stored checkpoint's header is out of bounds")
    layout = stored_layout(json.loads(handle.read(header_len)).get("__metadata__"))
    if layout is None:
        raise IngestError("the stored checkpoint holds no model folder")
    return layout.config


def check_dataset(info: TensorFileInfo) -> int:
    """Dataset layout per the contract; returns the number of training examples."""

    def split(inputs: str, targets: str) -> int:
        if inputs not in info.shapes or targets not in info.shapes:
            raise IngestError(f"a dataset needs both {inputs!r} and {targets!r} tensors")
        if info.dtypes[inputs] not in ("F16", "BF16", "F32", "F64", "I64"):
            raise IngestError(f"{inputs!r} must be floating point (or int64 token ids), not {info.dtypes[inputs]}")
        sequence = info.dtypes[inputs] == "I64" and info.shapes[targets] == info.shapes[inputs]  # next-token targets
        if info.dtypes[targets] != "I64" or (len(info.shapes[targets]) != 1 and not sequence):
            raise IngestError(f"{targets!r} must be int64 class labels of shape [N] (or, for int64 token inputs "
                              "[N, T], next-token targets of the same shape)")
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
    for prefix in ("", "eval_"):
        mask = f"{prefix}attention_mask"
        if mask in info.shapes and (info.shapes[mask] != info.shapes.get(f"{prefix}inputs") or info.dtypes[f"{prefix}inputs"] != "I64"):
            raise IngestError(f"{mask!r} must have the shape of {prefix + 'inputs'!r}, which must be int64 token ids")
    return num_examples

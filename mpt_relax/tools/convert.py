"""bfloat16 -> float16 conversion of a Hugging Face checkpoint directory, streamed and verified.

The library side of ``bfloat16_to_float16.py``. bf16 and fp32 tensors become fp16; fp16
tensors are copied; every other dtype (integers, bool, fp64, fp8) is copied byte for byte.

Range: fp16's largest finite value is 65504. Finite values beyond +-65504 are clamped to
+-65504 (never inf) and counted; non-zero values too small for fp16 (|x| <= 2**-25, half the
smallest subnormal) become zero and are counted as flushed; NaN and inf already in the source
pass through unchanged and are counted as non-finite.

Streaming: the safetensors layout of every output shard is planned from the tensor headers
before any data is read, so each tensor is cast in chunks of ``CHUNK_ELEMENTS`` and written
straight to its place in its output file. Memory holds one (memory-mapped) input shard plus
one chunk's temporaries, whatever the output shard size (verification adds the one output
tensor being checked).

Safety: everything is written into a temporary directory beside the destination, fsynced,
verified (every value re-read and compared bit for bit with an independent clamped cast of the
source) and only then renamed into place. Any error or Ctrl-C removes the temporary directory.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import struct
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mpt_relax.errors import MPTRelaxError
from mpt_relax.interrupts import raise_if_stopped
from mpt_relax.io import staging
from mpt_relax.io.checkpoint import BIN_INDEX, SAFETENSORS_INDEX, load_shard, read_index, weight_files
from mpt_relax.tools.convert_report import ConversionReport, TensorReport
from mpt_relax.tools.fp16_cast import CHUNK_ELEMENTS, CONVERTED_DTYPES, bits as _bits, cast_chunk as _cast_chunk
from mpt_relax.tools.fp16_cast import chunks as _chunks, reference_cast

OUTPUT_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 2 * 1024**3

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_INDEX_SUFFIXES = tuple(f"{suffix}.index.json" for suffix in _WEIGHT_SUFFIXES)
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
_SPACE_MARGIN = 64 * 1024**2  # headroom on top of the exact output size

log = logging.getLogger(__name__)


class ConversionError(MPTRelaxError):
    """The conversion cannot run or did not produce a correct checkpoint; nothing was written."""


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One source tensor: the shard it is read from and what it becomes."""

    name: str
    shape: tuple[int, ...]
    source_dtype: torch.dtype
    shard: Path

    @property
    def dtype(self) -> torch.dtype:
        """The dtype written: fp16 for bf16/fp32 sources, else the source dtype."""
        return torch.float16 if self.source_dtype in CONVERTED_DTYPES else self.source_dtype

    @property
    def numel(self) -> int:
        """Number of elements."""
        return int(torch.Size(self.shape).numel())

    @property
    def source_bytes(self) -> int:
        """Bytes read."""
        return self.numel * self.source_dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes written."""
        return self.numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class _OutShard:
    """One output safetensors file: its header bytes and the file offset of each tensor's data."""

    filename: str
    tensors: tuple[_Tensor, ...]  # in file order
    header: bytes
    offsets: dict[str, int]

    @property
    def size(self) -> int:
        """Size of the finished file in bytes."""
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    strict: bool = False,
    force: bool = False,
    verify: bool = True,
    any_arch: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool | None = None,
) -> ConversionReport:
    """Convert the checkpoint directory ``src`` to a float16 safetensors checkpoint at ``dst``.

    Args:
        src: HF checkpoint directory (sharded or single ``.safetensors`` / ``.bin``).
        dst: output directory; written as ``model-0000k-of-0000n.safetensors`` shards of at
            most ``shard_size`` tensor bytes (a larger single tensor gets a shard of its own),
            ``model.safetensors.index.json``, ``config.json`` with dtype float16, and copies of
            the source's other top-level files (tokenizer, generation config, remote code, ...).
        strict: refuse (raise, write nothing) if any value would have to be clamped.
        force: replace an existing ``dst`` (only once the new checkpoint is complete).
        verify: re-read the output and compare every tensor bit for bit with the clamped cast.
        any_arch: convert even when ``config.json`` is missing or not ``model_type: "mpt"``.
        shard_size: output shard bound in bytes.
        progress: tqdm progress bars over bytes; None shows them when stderr is a terminal.

    Raises:
        ConversionError / CheckpointError (both ValueError), or KeyboardInterrupt: with no
        output or temporary directory left behind (an existing ``dst`` is left as it was).
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    shards = weight_files(src)
    config, warnings = _read_config(src, any_arch)
    _check_destination(src, dst, force)
    if shard_size <= 0:
        raise ConversionError(f"shard size must be positive, got {shard_size}")
    tensors = _inventory(src, shards)
    layout = _layout(tensors, shard_size)
    copies, skipped = _other_files(src, shards)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _check_free_space(dst.parent, sum(s.size for s in layout) + sum(f.stat().st_size for f in copies))
        with staging.publish_directory(dst, is_ours=_replaceable(force), what=_WHAT, protect=[src],
                                       durable=True) as tmp:
            reports = _write_checkpoint(tmp, tensors, layout, config, copies, strict, show)
            verified = _verify(tmp, tensors, show) if verify else None
    except OSError as err:
        raise ConversionError(f"writing {dst} failed: {err}") from err
    return ConversionReport(
        source=src,
        destination=dst,
        tensors=reports,
        input_bytes=sum(t.source_bytes for t in tensors),
        output_bytes=sum(t.nbytes for t in tensors),
        shards=[s.filename for s in layout],
        copied_files=[f.name for f in copies],
        skipped_files=skipped,
        warnings=warnings,
        verified=verified,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------- checks


def _read_config(src: Path, any_arch: bool) -> tuple[dict | None, list[str]]:
    """The source ``config.json`` (None if absent and ``any_arch``) and warnings to report."""
    path = src / "config.json"
    if not path.is_file():
        if not any_arch:
            raise ConversionError(
                f"{src} has no config.json, so it cannot be checked to be an MPT checkpoint; "
                "pass any_arch=True (--any-arch) to convert the weights anyway"
            )
        return None, _warn(f"{src} has no config.json; the output will have none either")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    if config.get("model_type") != "mpt":
        message = f"{path}: model_type is {config.get('model_type')!r}, not 'mpt'"
        if not any_arch:
            raise ConversionError(f"{message}; pass any_arch=True (--any-arch) to convert it anyway")
        return config, _warn(f"{message}; converting anyway (--any-arch)")
    return config, []


def _warn(message: str) -> list[str]:
    """Log ``message`` as a warning now and return it for the report."""
    log.warning(message)
    return [message]


_WHAT = f"a converted checkpoint (no {OUTPUT_INDEX})"


def _replaceable(force: bool):
    """What an existing destination must be for ``force`` to replace it: a checkpoint directory
    (it holds ``model.safetensors.index.json``, as every output of ours does). Nothing without ``force``."""
    return (lambda path: (path / OUTPUT_INDEX).is_file()) if force else (lambda path: False)


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse any overlap of ``src`` and ``dst``, an existing ``dst`` without ``force``, and, even
    with ``force``, a ``dst`` that is not a checkpoint directory (a file, a link, other data)."""
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_src == real_dst or real_src in real_dst.parents or real_dst in real_src.parents:
        raise ConversionError(f"destination {dst} overlaps the source {src}; choose a directory outside it")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise ConversionError(f"{dst} already exists; pass force=True (--force) to replace it")
    staging.check_output(dst, _replaceable(force), _WHAT, protect=[src])


def _check_free_space(directory: Path, needed: int) -> None:
    """Raise unless ``directory``'s file system has ``needed`` bytes (plus a margin) free."""
    free = shutil.disk_usage(directory).free
    if free < needed + _SPACE_MARGIN:
        raise ConversionError(
            f"not enough disk space in {directory}: the output needs {needed / 1e9:.2f} GB "
            f"(+{_SPACE_MARGIN // 1024**2} MB margin), {free / 1e9:.2f} GB free"
        )


# ---------------------------------------------------------------------------- planning


def _inventory(src: Path, shards: list[Path]) -> list[_Tensor]:
    """Every tensor of the checkpoint, shard by shard and by name inside a shard (the order in
    which they are converted), from the shard headers (no data read).

    Raises on duplicate names, unsupported dtypes, an empty checkpoint, and index entries whose
    tensor is not in the shards.
    """
    tensors: dict[str, _Tensor] = {}
    for shard in shards:
        state = load_shard(shard)
        for name, x in sorted(state.items()):
            if name in tensors:
                raise ConversionError(f"tensor {name} appears in both {tensors[name].shard.name} and {shard.name}")
            if x.dtype not in _SAFETENSORS_DTYPES:
                raise ConversionError(f"tensor {name} in {shard.name} has dtype {x.dtype}, not storable in safetensors")
            tensors[name] = _Tensor(name, tuple(x.shape), x.dtype, shard)
        del state
    if not tensors:
        raise ConversionError(f"the weight files of {src} hold no tensors")
    missing = sorted(set(read_index(src) or {}) - set(tensors))
    if missing:
        raise ConversionError(
            f"the index of {src} lists {len(missing)} tensor(s) that no shard holds, e.g. {missing[0]}; re-download it"
        )
    return list(tensors.values())


def _layout(tensors: list[_Tensor], shard_size: int) -> list[_OutShard]:
    """Group ``tensors`` (in read order) into output shards of at most ``shard_size`` bytes.

    Inside a shard tensors are ordered by decreasing item size, then name, so every tensor's
    data stays aligned to its item size.
    """
    groups: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    shards = []
    for k, group in enumerate(groups, start=1):
        ordered = tuple(sorted(group, key=lambda t: (-t.dtype.itemsize, t.name)))
        header, offsets = _safetensors_header(ordered)
        shards.append(_OutShard(f"model-{k:05d}-of-{len(groups):05d}.safetensors", ordered, header, offsets))
    return shards


def _safetensors_header(tensors: tuple[_Tensor, ...]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header for ``tensors`` stored back to back in this order.

    Returns the header bytes (8-byte little-endian length, then JSON padded with spaces to a
    multiple of 8) and each tensor's absolute data offset in the file.
    """
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    begin = 0
    for t in tensors:
        dtype = _SAFETENSORS_DTYPES[t.dtype]
        entries[t.name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [begin, begin + t.nbytes]}
        begin += t.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    header = struct.pack("<Q", len(text)) + text
    return header, {t.name: len(header) + entries[t.name]["data_offsets"][0] for t in tensors}


def _other_files(src: Path, shards: list[Path]) -> tuple[list[Path], list[str]]:
    """Top-level source files to copy, and "name (reason)" for entries left out.

    Left out silently: the converted shards, the weight indexes and config.json (rewritten).
    Left out and reported: hidden entries, subdirectories, and weight files of other formats.
    """
    copies, skipped = [], []
    for entry in sorted(src.iterdir()):
        if entry in shards or entry.name in ("config.json", SAFETENSORS_INDEX, BIN_INDEX):
            continue
        if entry.name.startswith("."):
            skipped.append(f"{entry.name} (hidden)")
        elif entry.is_dir():
            skipped.append(f"{entry.name}/ (directory)")
        elif entry.name.endswith(_WEIGHT_SUFFIXES + _WEIGHT_INDEX_SUFFIXES):
            skipped.append(f"{entry.name} (weights not converted)")
        elif entry.is_file():
            copies.append(entry)
        else:
            skipped.append(f"{entry.name} (not a regular file)")
    return copies, skipped


# ---------------------------------------------------------------------------- writing


def _write_checkpoint(
    tmp: Path,
    tensors: list[_Tensor],
    layout: list[_OutShard],
    config: dict | None,
    copies: list[Path],
    strict: bool,
    show: bool,
) -> list[TensorReport]:
    """Write shards, index, config and copied files into ``tmp``; one report per tensor."""
    placement = {t.name: (tmp / shard.filename, shard.offsets[t.name]) for shard in layout for t in shard.tensors}
    for shard in layout:
        with open(tmp / shard.filename, "wb") as f:
            f.write(shard.header)
            f.truncate(shard.size)
    reports = []
    with _progress_bar("convert", tensors, show) as bar:
        for shard, group in itertools.groupby(tensors, key=lambda t: t.shard):
            state = load_shard(shard)
            for t in group:
                raise_if_stopped()
                report = _write_tensor(t, state[t.name], *placement[t.name], bar)
                if strict and report.clamped:
                    raise ConversionError(
                        f"{t.name} has {report.clamped} value(s) beyond +-65504 that float16 cannot hold "
                        "(strict mode refuses to clamp); nothing was written"
                    )
                reports.append(report)
            del state
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {t.name: shard.filename for shard in layout for t in shard.tensors},
    }
    (tmp / OUTPUT_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(_float16_config(config), indent=2) + "\n")
    for f in copies:
        shutil.copyfile(f, tmp / f.name)
    return reports


def _progress_bar(desc: str, tensors: list[_Tensor], show: bool) -> tqdm:
    """A tqdm bar over the source bytes of ``tensors`` on stderr (inert unless ``show``)."""
    total = sum(t.source_bytes for t in tensors)
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not show, file=sys.stderr)


def _float16_config(config: dict) -> dict:
    """``config`` with ``torch_dtype`` (and ``dtype``, where present: transformers 5) = float16."""
    out = dict(config, torch_dtype="float16")
    if "dtype" in out:
        out["dtype"] = "float16"
    return out


def _write_tensor(t: _Tensor, x: torch.Tensor, path: Path, offset: int, bar: tqdm) -> TensorReport:
    """Cast (or copy) ``x`` chunk by chunk into ``path`` at byte ``offset``; count what changed."""
    report = TensorReport(t.name, t.shape, t.source_dtype, t.dtype)
    converted = t.source_dtype in CONVERTED_DTYPES
    buffer = torch.empty(min(t.numel, CHUNK_ELEMENTS), dtype=torch.float16) if converted else None
    with open(path, "r+b") as f:
        f.seek(offset)
        for chunk in _chunks(x):
            if converted:
                out, clamped, flushed, nonfinite = _cast_chunk(chunk, buffer[: chunk.numel()])
                report.clamped += clamped
                report.flushed += flushed
                report.nonfinite += nonfinite
            else:
                out = chunk
                if chunk.dtype == torch.float16:
                    report.nonfinite += chunk.numel() - int(torch.isfinite(chunk).sum())
            f.write(out.contiguous().view(torch.uint8).numpy())
            bar.update(chunk.numel() * chunk.element_size())
    return report


# ---------------------------------------------------------------------------- verification


def _verify(tmp: Path, tensors: list[_Tensor], show: bool) -> int:
    """Re-open the written checkpoint with the safetensors library and check every tensor's
    name, shape, dtype and bits against :func:`reference_cast` of the source; returns the
    number of tensors checked."""
    from safetensors import safe_open

    weight_map = json.loads((tmp / OUTPUT_INDEX).read_text())["weight_map"]
    if set(weight_map) != {t.name for t in tensors}:
        raise ConversionError("verification failed: the output index does not list exactly the source tensors")
    for filename in set(weight_map.values()):
        with safe_open(tmp / filename, framework="pt") as f:
            if set(f.keys()) != {n for n, fn in weight_map.items() if fn == filename}:
                raise ConversionError(f"verification failed: {filename} does not hold the tensors the index says")
    with _progress_bar("verify", tensors, show) as bar:
        for shard, group in itertools.groupby(tensors, key=lambda t: t.shard):
            state = load_shard(shard)
            for t in group:
                raise_if_stopped()
                with safe_open(tmp / weight_map[t.name], framework="pt") as f:
                    written = f.get_tensor(t.name)
                _check_tensor(t.name, state[t.name], written, bar)
                del written
            del state
    return len(tensors)


def _check_tensor(name: str, source: torch.Tensor, written: torch.Tensor, bar: tqdm) -> None:
    """Raise unless ``written`` has the shape and dtype of ``reference_cast(source)`` and the
    same bits, compared chunk by chunk."""
    expected_dtype = torch.float16 if source.dtype in CONVERTED_DTYPES else source.dtype
    if written.shape != source.shape or written.dtype != expected_dtype:
        raise ConversionError(
            f"verification failed: {name} was written as {written.dtype} {tuple(written.shape)}, "
            f"expected {expected_dtype} {tuple(source.shape)}"
        )
    for src_chunk, out_chunk in zip(_chunks(source), _chunks(written)):
        if not torch.equal(_bits(reference_cast(src_chunk)), _bits(out_chunk)):
            raise ConversionError(f"verification failed: {name} differs from the clamped float16 cast of the source")
        bar.update(src_chunk.numel() * src_chunk.element_size())

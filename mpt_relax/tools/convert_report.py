"""What :func:`mpt_relax.tools.convert.convert_checkpoint` reports: per tensor and in all."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


@dataclasses.dataclass
class TensorReport:
    """What happened to one tensor; the counts are numbers of elements."""

    name: str
    shape: tuple[int, ...]
    source_dtype: torch.dtype
    dtype: torch.dtype  # as written
    clamped: int = 0  # finite values beyond +-65504, written as +-65504
    flushed: int = 0  # non-zero values that became (signed) zero
    nonfinite: int = 0  # NaN / inf in the source, written unchanged

    @property
    def notable(self) -> bool:
        """Whether any value was clamped, flushed or non-finite."""
        return bool(self.clamped or self.flushed or self.nonfinite)


@dataclasses.dataclass
class ConversionReport:
    """The result of :func:`convert_checkpoint`; ``str(report)`` is the summary."""

    source: Path
    destination: Path
    tensors: list[TensorReport]
    input_bytes: int  # tensor bytes read
    output_bytes: int  # tensor bytes written (the index's total_size)
    shards: list[str]  # output shard file names
    copied_files: list[str]
    skipped_files: list[str]  # "name (reason)" for source entries neither converted nor copied
    warnings: list[str]
    verified: int | None  # tensors verified, None when verification was skipped
    seconds: float

    @property
    def clamped(self) -> int:
        """Values clamped to +-65504, over all tensors."""
        return sum(t.clamped for t in self.tensors)

    @property
    def flushed(self) -> int:
        """Non-zero values flushed to zero, over all tensors."""
        return sum(t.flushed for t in self.tensors)

    @property
    def nonfinite(self) -> int:
        """NaN / inf values found in the source (and passed through), over all tensors."""
        return sum(t.nonfinite for t in self.tensors)

    def summary(self, details: bool = True, max_tensor_lines: int = 20) -> str:
        """Human-readable result; ``details`` adds one line per tensor with clamped, flushed or
        non-finite values (at most ``max_tensor_lines``) and the copied / skipped files."""
        gb = self.input_bytes / 1e9
        lines = [
            f"converted {len(self.tensors)} tensors ({gb:.3f} GB -> {self.output_bytes / 1e9:.3f} GB) "
            f"into {len(self.shards)} shard(s) in {self.destination}",
            f"clamped to +-65504: {self.clamped}; flushed to zero: {self.flushed}; "
            f"NaN/inf passed through: {self.nonfinite}",
        ]
        if details:
            notable = [t for t in self.tensors if t.notable]
            lines += [
                f"  {t.name}: clamped {t.clamped}, flushed {t.flushed}, nonfinite {t.nonfinite}"
                for t in notable[:max_tensor_lines]
            ]
            if len(notable) > max_tensor_lines:
                lines.append(f"  ... and {len(notable) - max_tensor_lines} more tensors")
            if self.copied_files:
                lines.append(f"copied: {', '.join(self.copied_files)}")
            if self.skipped_files:
                lines.append(f"not copied: {', '.join(self.skipped_files)}")
        lines.append(
            f"verified {self.verified} tensors" if self.verified is not None else "verification skipped (--no-verify)"
        )
        lines.append(f"time: {self.seconds:.1f} s ({gb / max(self.seconds, 1e-9):.2f} GB/s of input)")
        return "\n".join(lines)

    __str__ = summary

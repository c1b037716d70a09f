"""Result types of the memory model: a byte breakdown per loss path, and its table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .units import GIB, parse_bytes

PATHS = ("eager", "fused")


@dataclass
class PathBreakdown:
    """Bytes per GPU for one loss path. ``parts`` are the live sizes of each kind of tensor;
    ``phases`` the live total at each phase of the step; ``peak`` the largest phase.

    Parts do not all coexist (activations are freed as gradients appear), so ``peak`` is
    smaller than ``sum(parts.values())``.
    """

    parts: dict[str, int]
    phases: dict[str, int]

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def to_dict(self) -> dict[str, Any]:
        return {"parts": self.parts, "phases": self.phases, "peak": self.peak}


@dataclass
class MemoryEstimate:
    """Result of :func:`estimate`: both paths, the setup and the assumptions made."""

    model: str
    params: dict[str, int]
    trainable_params: int
    setup: dict[str, Any]
    eager: PathBreakdown
    fused: PathBreakdown
    assumptions: list[str] = field(default_factory=list)

    def path(self, path: str) -> PathBreakdown:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        return getattr(self, path)

    def total(self, path: str = "fused") -> int:
        """Peak bytes per GPU of one training step on ``path`` ("eager" or "fused")."""
        return self.path(path).peak

    def fits(self, gpu_bytes: int | float | str, path: str = "fused") -> bool:
        """Whether ``path``'s peak fits in ``gpu_bytes`` (an int or a size like ``"80GB"``)."""
        return self.total(path) <= parse_bytes(gpu_bytes, "gpu_bytes")

    def format_table(self, gpu_bytes: int | float | str | None = None) -> str:
        """An aligned table in GiB: every part and phase, eager beside fused, and their ratio."""
        rows: list[tuple[str, str, str, str]] = [("per GPU [GiB]", "eager", "fused", "eager/fused")]

        def add(label: str, eager: int, fused: int) -> None:
            ratio = f"{eager / fused:.2f}x" if fused else ("-" if not eager else "inf")
            rows.append((label, f"{eager / GIB:.2f}", f"{fused / GIB:.2f}", ratio))

        for key in self.eager.parts:
            add(key.replace("_", " "), self.eager.parts[key], self.fused.parts[key])
        rows.append(("", "", "", ""))
        for key in self.eager.phases:
            add(f"phase: {key}", self.eager.phases[key], self.fused.phases[key])
        rows.append(("", "", "", ""))
        add("PEAK", self.eager.peak, self.fused.peak)
        if gpu_bytes is not None:
            limit = parse_bytes(gpu_bytes, "gpu_bytes")
            verdict = ["fits" if self.fits(limit, p) else "OUT OF MEMORY" for p in PATHS]
            rows.append((f"fits in {limit / GIB:.1f} GiB", *verdict, ""))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [self._title()]
        for i, r in enumerate(rows):
            line = r[0].ljust(widths[0]) + "".join(
                "  " + c.rjust(w) for c, w in zip(r[1:], widths[1:])
            )
            lines.append(line.rstrip())
            if i == 0:
                lines.append("-" * len(line))
        return "\n".join(lines)

    def _title(self) -> str:
        s = self.setup
        return (
            f"{self.model}: {self.params['total'] / 1e9:.2f} B params "
            f"({self.trainable_params / 1e9:.3g} B trainable), loss={s['loss']}, "
            f"micro-batch {s['batch_size']} x seq {s['seq_len']}, "
            f"{s['world_size']} GPU(s) sharding={s['sharding']}, dtype={s['dtype']}, "
            f"activation checkpointing={'on' if s['activation_checkpointing'] else 'off'}"
            + (f", LoRA r={s['lora']}" if s["lora"] else "")
            + f", fused gradient path {s['grad_mode']}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything above as plain JSON-ready values (``fastalign memory --json``)."""
        return {
            "model": self.model,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "setup": self.setup,
            "eager": self.eager.to_dict(),
            "fused": self.fused.to_dict(),
            "assumptions": self.assumptions,
        }

"""A graceful stop: the first SIGINT or SIGTERM is remembered so the training loop can finish
its step, save a checkpoint and return; a second one acts as it normally would."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that records the first stop signal in ``signum`` (None until then).

    Example:
        >>> with StopRequest() as stop:
        ...     stop.signum is None
        True
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers: main thread only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()  # a second signal: KeyboardInterrupt / termination as usual

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name


def agreed_signal(signum: int | None, distributed: bool, device: torch.device) -> int:
    """The stop signal if any rank got one, else 0: all ranks stop after the same step (a
    collective under ``torchrun``)."""
    if not distributed:
        return signum or 0
    flag = torch.tensor([signum or 0], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())

"""A run's figures (``plots``) drawn to PNG, in a worker process while the job goes on when asked:
jobs trained together end together, and drawing is most of what each then does in this process.

The workers are started once per process (``spawn``: this process has threads and perhaps CUDA),
ignore SIGINT and SIGTERM (the job that asked stops them, not a signal sent to the whole process
group), and leave with this process. A worker that cannot start or dies: the figure is drawn here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from resnet_sweep.tracking import plots

log = logging.getLogger(__name__)

_workers: ProcessPoolExecutor | None = None


def png(kind: str, args: tuple, dpi: float) -> tuple[bytes, list[tuple[int, int, int, int]]]:
    """``plots.<kind>(*args)`` as PNG bytes, and the pixel box (left, top, right, bottom) of each
    of its panels (axes with their labels, 0.1 inch around)."""
    fig = getattr(plots, kind)(*args)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        renderer = fig.canvas.get_renderer()
        scale, height = dpi / fig.dpi, fig.get_figheight() * dpi
        pad, boxes = 0.1 * fig.dpi, []
        for ax in fig.axes:
            box = ax.get_tightbbox(renderer)
            x0, y0, x1, y1 = ((box.x0 - pad), (box.y0 - pad), (box.x1 + pad), (box.y1 + pad))
            boxes.append(
                (max(0, int(x0 * scale)), max(0, int(height - y1 * scale)), int(x1 * scale), int(height - y0 * scale))
            )
        return buffer.getvalue(), boxes
    finally:
        plots.close(fig)


def _ignore_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_count() -> int:
    """The cores this process may use, at most four: the figures pile up when a group's jobs end
    together, and this process then waits for them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


def _pool() -> ProcessPoolExecutor:
    global _workers
    if _workers is None:
        _workers = ProcessPoolExecutor(
            worker_count(), mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_signals
        )
    return _workers


class Drawing:
    """One figure being drawn: ``png()`` waits for it (drawn here if its worker failed)."""

    def __init__(self, kind: str, args: tuple, *, dpi: float = 100, background: bool = False):
        self.kind, self.args, self.dpi = kind, args, dpi
        self.future: Future | None = None
        self.drawn: tuple[bytes, list] | None = None
        if background:
            with contextlib.suppress(RuntimeError, OSError, BrokenProcessPool):
                self.future = _pool().submit(png, kind, args, dpi)

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def _drawn(self) -> tuple[bytes, list]:
        if self.future is not None:
            try:
                return self.future.result()
            except (BrokenProcessPool, OSError, EOFError) as e:
                log.debug("figure worker failed (%s): drawing %s here", e, self.kind)
                _forget_pool()
                self.future = None
        if self.drawn is None:
            self.drawn = png(self.kind, self.args, self.dpi)
        return self.drawn

    def png(self) -> bytes:
        return self._drawn()[0]

    def panel(self, index: int):
        """Panel ``index`` of the figure, cut from its PNG (a PIL image)."""
        from PIL import Image

        data, boxes = self._drawn()
        with Image.open(io.BytesIO(data)) as image:
            return image.crop(boxes[index]).convert("RGB")


def _forget_pool() -> None:
    global _workers
    if _workers is not None:
        _workers.shutdown(wait=False, cancel_futures=True)
        _workers = None

"""Batches of model calls formed across the events one worker process runs at once.

Each batched stage method (`BATCHED_METHODS`) gets a `Batcher`. Task threads submit their
images or texts and wait; the batcher's one model thread runs a batch once it holds
`max_size` items or its oldest item has waited `max_wait_ms`, and hands each caller its own
rows. A batch that raises runs again one item at a time, so that a bad image fails only its
own product. While a model thread works, other tasks download, decode and write in their
own threads.

`batched_models` gives a `Models` whose stage objects are shallow copies with their batched
methods replaced: the weights stay one copy per process, shared by every task thread.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch
from celery.exceptions import SoftTimeLimitExceeded

from schemas.settings import BatchSettings, Stage
from worker.errors import TransientFault
from worker.models import MODEL_STAGES, Models

log = structlog.get_logger(__name__)

BATCHED_METHODS = ("segment", "tag", "embed", "tag_and_embed")
"""Stage methods that take a sequence (images or texts) and give one row per item: a list,
an array of rows, or a tuple of those."""

_deadline: ContextVar[float | None] = ContextVar("batch_deadline", default=None)
_tasks_lock = threading.Lock()
_tasks_running = 0
"""Tasks inside `time_limit` in this process: once each has its items queued, no batch
need wait for more."""


class BatchTimeout(TransientFault):
    """A task's time limit passed while it waited for a batch; the task is retried."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Batch waits inside this block end `seconds` from now with BatchTimeout; so does
    Celery's soft time limit, which only a prefork pool enforces."""
    global _tasks_running
    token = _deadline.set(time.monotonic() + seconds)
    with _tasks_lock:
        _tasks_running += 1
    try:
        yield
    except SoftTimeLimitExceeded as exc:
        raise BatchTimeout(f"the task ran past its time limit of {seconds:g} s") from exc
    finally:
        with _tasks_lock:
            _tasks_running -= 1
        _deadline.reset(token)


def precision(device: torch.device, *, mixed: bool, cpu_dtype: torch.dtype | None = None) -> Any:
    """The autocast context stage calls run in: float16 on CUDA when `mixed`; on CPU only
    with an explicit `cpu_dtype` (bfloat16, for tests), otherwise float32."""
    if mixed and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if mixed and device.type == "cpu" and cpu_dtype is not None:
        return torch.autocast("cpu", dtype=cpu_dtype)
    return contextlib.nullcontext()


def _precision_of(stage: Stage, device: torch.device, settings: BatchSettings) -> Callable[[], Any]:
    """The autocast context of `stage`'s batches, as `Batcher` takes it."""
    return lambda: precision(device, mixed=settings.mixed_for(stage))


@dataclass
class _Item:
    value: Any
    caller: int
    future: Future[Any] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """One model thread in front of one stage method; callable like the method itself."""

    def __init__(
        self,
        name: str,
        call: Callable[[list[Any]], Any],
        *,
        max_size: int,
        max_wait_s: float,
        context: Callable[[], Any] = contextlib.nullcontext,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, received {max_size!r}")
        self.name = name
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._call = call
        self._context = context
        self._queue: deque[_Item] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __call__(self, values: Sequence[Any]) -> Any:
        """The stage's output for `values`, computed within batches shared with other tasks."""
        if len(values) == 0:
            return self._call(list(values))

        futures = self.submit(values)
        deadline = _deadline.get()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        _, pending = wait(futures, timeout=timeout)
        if pending:
            for future in pending:
                future.cancel()
            raise BatchTimeout(
                f"{self.name}: {len(pending)} of {len(futures)} items got no result within "
                "the task's time limit (ENRICH_BATCH__TASK_TIME_LIMIT_S)"
            )

        return _join([future.result() for future in futures])

    def submit(self, values: Sequence[Any]) -> list[Future[Any]]:
        """Queue each value for the next batches; one future per value, in order."""
        caller = threading.get_ident()
        items = [_Item(value, caller) for value in values]
        with self._ready:
            if self._closed:
                raise RuntimeError(f"batcher {self.name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run_forever, name=f"batch-{self.name}", daemon=True
                )
                self._thread.start()
            self._queue.extend(items)
            self._ready.notify()
        return [item.future for item in items]

    def close(self) -> None:
        """Stop the model thread once the queued items have run."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join()

    def _run_forever(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[_Item] | None:
        """Up to `max_size` items, once that many wait, or every running task has queued its
        items, or the oldest has waited `max_wait_s`; None once closed and drained. Items
        whose caller gave up are left out."""
        with self._ready:
            while True:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return None

                closes_at = self._queue[0].queued_at + self.max_wait_s
                while not self._full():
                    remaining = closes_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._ready.wait(remaining)

                taken = [self._queue.popleft() for _ in range(min(self.max_size, len(self._queue)))]
                batch = [item for item in taken if item.future.set_running_or_notify_cancel()]
                if batch:
                    return batch

    def _full(self) -> bool:
        """No reason to wait for more items (called under the condition's lock)."""
        if self._closed or len(self._queue) >= self.max_size:
            return True
        callers = len({item.caller for item in self._queue})
        return 0 < _tasks_running <= callers

    def _run(self, batch: list[_Item]) -> None:
        started = time.monotonic()
        try:
            with self._context():
                output = self._call([item.value for item in batch])
            rows = _split(output, len(batch))
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.warning(
                "batch_failed", stage=self.name, batch_size=len(batch), reason=repr(exc)[:300]
            )
            for item in batch:
                self._run_alone(item)
            return

        for item, row in zip(batch, rows, strict=True):
            item.future.set_result(row)
        log.debug(
            "batch_finished",
            stage=self.name,
            batch_size=len(batch),
            waited_ms=round((started - batch[0].queued_at) * 1000, 1),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    def _run_alone(self, item: _Item) -> None:
        """One item of a failed batch on its own: its result, or its own exception."""
        try:
            with self._context():
                output = self._call([item.value])
            item.future.set_result(_split(output, 1)[0])
        except Exception as exc:
            item.future.set_exception(exc)


def _split(output: Any, count: int) -> list[Any]:
    """Rows of a stage's output, one per item: list items, array rows, tuples of those."""
    if isinstance(output, tuple):
        columns = [_split(part, count) for part in output]
        return [tuple(column[index] for column in columns) for index in range(count)]
    rows = list(output)
    if len(rows) != count:
        raise RuntimeError(f"the stage gave {len(rows)} rows for {count} items")
    return rows


def _join(rows: list[Any]) -> Any:
    """The inverse of `_split` for one caller's rows: arrays stacked, tuples per part."""
    first = rows[0]
    if isinstance(first, tuple):
        return tuple(_join(list(part)) for part in zip(*rows, strict=True))
    if isinstance(first, np.ndarray):
        return np.stack(rows)
    return rows


def batched_models(
    models: Models, settings: BatchSettings, *, device: torch.device
) -> tuple[Models, list[Batcher]]:
    """`models` with each stage's batched methods behind a batcher, and the batchers.

    Every dataclass field of `Models` with one of `BATCHED_METHODS` is wrapped, so a stage
    added to `Models` is batched without a change here.
    """
    batchers: list[Batcher] = []
    replaced: dict[str, Any] = {}
    for stage_field in dataclasses.fields(models):
        stage = getattr(models, stage_field.name)
        methods = [name for name in BATCHED_METHODS if callable(getattr(stage, name, None))]
        if not stage_field.init or not methods:
            continue

        wrapped = copy.copy(stage)
        for method in methods:
            batcher = Batcher(
                f"{stage_field.name}.{method}",
                getattr(stage, method),
                max_size=settings.max_size,
                max_wait_s=settings.max_wait_ms / 1000,
                context=_precision_of(MODEL_STAGES[stage_field.name], device, settings),
            )
            setattr(wrapped, method, batcher)
            batchers.append(batcher)
        replaced[stage_field.name] = wrapped

    return dataclasses.replace(models, **replaced), batchers

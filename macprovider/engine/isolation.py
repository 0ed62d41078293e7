"""Per-sequence fault isolation for the generation thread.

mlx-lm's `BatchGenerator` calls every sequence's sampler and logits processors inside one `next()` step;
an exception from any of them would leave `next()` and end the generation thread — and with it every
request in flight. These wrappers catch a sequence's own exception, record it on that sequence
(`SequenceState.fault`) and return a harmless stand-in (the greedy token, the logits unchanged), so the
step completes for the rest of the batch; the engine then ends the faulted sequence alone, before the
stand-in token reaches its client.

No MLX at import: `mx` is imported inside the wrappers (they only run on the generation thread).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from macprovider.core.errors import ApiError
from macprovider.engine.sequence import SequenceState

log = logging.getLogger("macprovider.engine.isolation")


def guarded_sampler(sequence: SequenceState, sampler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`sampler` (logprobs of shape (1, vocab) → token ids of shape (1,)) for `sequence` alone: an exception,
    or a result of the wrong shape, marks the sequence faulted and yields the greedy token instead.

    A distinct wrapper per sequence makes `BatchGenerator` call each row's sampler on its own row (it batches
    one call only when every row shares one sampler object), which is what lets a fault be attributed."""
    import mlx.core as mx

    def sample(logprobs: Any) -> Any:
        if sequence.fault is None:
            try:
                tokens = sampler(logprobs)
                if tuple(tokens.shape) == tuple(logprobs.shape[:-1]):
                    return tokens
                raise ValueError(f"the sampler returned shape {tuple(tokens.shape)} for {tuple(logprobs.shape)}")
            except Exception as exc:  # noqa: BLE001 - any failure is this sequence's, reported to its client
                record_fault(sequence, exc, "sampling")
        return mx.argmax(logprobs, axis=-1)

    return sample


def guarded_processor(sequence: SequenceState, processor: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """A logits processor ((tokens, logits of shape (1, vocab)) → logits) for `sequence` alone: an exception,
    or a result of another shape, marks the sequence faulted and passes the logits through unchanged (the
    token sampled from them is never delivered: the sequence ends at this step)."""

    def process(tokens: Any, logits: Any) -> Any:
        if sequence.fault is None:
            try:
                result = processor(tokens, logits)
                if tuple(result.shape) == tuple(logits.shape):
                    return result
                raise ValueError(f"a logits processor returned shape {tuple(result.shape)} for {tuple(logits.shape)}")
            except Exception as exc:  # noqa: BLE001 - any failure is this sequence's, reported to its client
                record_fault(sequence, exc, "applying a logits processor")
        return logits

    return process


def guard(sequence: SequenceState, sampler: bool = True) -> None:
    """Wrap `sequence`'s logits processors, and its sampler when `sampler` (a distributed group keeps its
    samplers as built: followers must share sampler objects exactly as rank 0 does), in place."""
    if sampler:
        sequence.sampler = guarded_sampler(sequence, sequence.sampler)
    sequence.logits_processors = [guarded_processor(sequence, p) for p in sequence.logits_processors]


def record_fault(sequence: SequenceState, exc: BaseException, during: str) -> None:
    """Mark `sequence` faulted (the first fault wins) and log it once, with the traceback, server-side."""
    if sequence.fault is None:
        log.warning("one sequence failed while %s; ending it alone", during, exc_info=exc)
        sequence.fault = exc


def fault_report(exc: BaseException) -> tuple[int, str, str | None]:
    """(HTTP status, client message, param) for a sequence's fault: an `ApiError` raised by the request's own
    processing keeps its status, message and param (the request's input caused it); anything else is a
    500 for that request alone, with a one-line, path-free description."""
    if isinstance(exc, ApiError):
        return exc.status, exc.message, exc.param
    text = str(exc).splitlines()[0] if str(exc) else ""
    described = f"{exc.__class__.__name__}: {text}"[:300] if text else exc.__class__.__name__
    return 500, f"generating this response failed: {described}", None

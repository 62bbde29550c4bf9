"""Why an example was skipped: one exception type with a short reason code for the skip counters."""

from __future__ import annotations

from typing import Any

# Reason codes the pipeline counts (metrics `skipped/<reason>`). New codes are fine; keep them short.
REASONS = (
    "audio_missing",  # the file a manifest names does not exist
    "audio_undecodable",  # truncated, random bytes, unknown format
    "audio_empty",  # zero samples
    "audio_nonfinite",  # NaN or inf samples
    "audio_too_long",  # longer than the model's window (30 s) and cropping is off
    "sample_rate",  # a rate the source declares wrongly or that cannot be resampled
    "record_invalid",  # bytes in a shard that are not a jaxasr record
    "text_empty",
    "text_not_utf8",
    "label_too_long",  # transcript does not fit the label budget (never truncated)
    "text_too_long",  # text-only input does not fit the largest text bucket
    "no_valid_examples",  # a whole input (manifest, dataset) had nothing usable
)


class DataError(ValueError):
    """A bad example. `reason` is a short code for counters, the message names the example."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def skip_marker(error: DataError, example_id: str = "") -> dict[str, Any]:
    """What a source or transform yields in place of a bad example (counted later by reason)."""
    return {"skip": error.reason, "message": str(error), "id": example_id}


def is_skip(example: dict[str, Any]) -> bool:
    return "skip" in example

"""Why an example was skipped: one exception type with a short reason code for the skip counters."""

from __future__ import annotations

# Reason codes the pipeline counts (metrics `skipped/<reason>`). New codes are fine; keep them short.
REASONS = (
    "audio_undecodable",  # truncated, random bytes, unknown format
    "audio_empty",  # zero samples
    "audio_nonfinite",  # NaN or inf samples
    "audio_too_long",  # longer than the model's window (30 s) and cropping is off
    "sample_rate",  # a rate the source declares wrongly or that cannot be resampled
    "text_empty",
    "text_not_utf8",
    "label_too_long",  # transcript does not fit the label budget (never truncated)
)


class DataError(ValueError):
    """A bad example. `reason` is a short code for counters, the message names the example."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

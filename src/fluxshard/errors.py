"""Errors that reach the user as one line, naming the file or input and the problem."""

from __future__ import annotations


class FluxShardError(Exception):
    """Base class: the message is complete and user-facing (the CLI prints it as ``error: <msg>``)."""


class VideoError(FluxShardError):
    """A video could not be opened or decoded (missing, empty, corrupt, truncated, no video stream)."""

    def __init__(self, message: str, frames_decoded: int = 0) -> None:
        super().__init__(message)
        self.frames_decoded = frames_decoded


class DataError(FluxShardError):
    """A data set or clip could not be obtained or verified."""

"""Every error featrecon raises on purpose. Imports nothing, so every module may import it."""

from __future__ import annotations

from collections.abc import Callable


class FeatreconError(ValueError):
    """A problem with the user's input or files: the commands print its message on one line."""


class CorruptChunk(Exception):
    """A stored chunk of one sample failed its checksum, could not be decoded, or is missing.
    Raised by every cache reader (Zarr and HDF5); the stages turn it into a FeatreconError
    naming the cache, the sample's id and the repair command."""

    def __init__(self, array: str, sample: int, why: str):
        super().__init__(f"{array}: sample {sample}: {why}")
        self.array, self.sample, self.why = array, sample, why

    def handle(self, on_error: Callable[[CorruptChunk], None] | None) -> None:
        """Raise this damage, or hand it to `on_error` (a reader told to go on past damaged samples)."""
        if on_error is None:
            raise self
        on_error(self)

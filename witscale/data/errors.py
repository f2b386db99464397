"""Errors of the data pipeline. Each one names the file and record it is about, so the CLI can print
``error: <file>:<where>: <problem>`` without a traceback."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input that stops the whole run (unreadable file, empty file, unknown format, bad tokenizer)."""

    def __init__(self, problem: str, file: str | None = None, where: str | None = None):
        self.problem = problem
        self.file = file
        self.where = where      # e.g. "line 3" (JSONL) or "record 7" (JSON array, parquet)
        super().__init__(self.location_prefix() + problem)

    def location_prefix(self) -> str:
        parts = [p for p in (self.file, self.where) if p]
        return ":".join(parts) + ": " if parts else ""

    def located(self, file: str | None = None, where: str | None = None):
        """The same error with a file/record filled in where it was missing."""
        return type(self)(self.problem, self.file or file, self.where or where)


class RecordError(DataError):
    """A problem with one record; ``--skip-invalid`` turns it into a counted skip."""


class BoundaryError(RecordError):
    """A token covers characters of two different classes: the loss mask would be ambiguous."""


class TokenizerError(DataError):
    """The tokenizer cannot be loaded or lacks a token the template needs."""

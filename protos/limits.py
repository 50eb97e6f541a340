"""What one job and one request may ask of a server, and the error a job that asks
too much (or anything invalid) gets."""

from __future__ import annotations

from dataclasses import dataclass


class JobError(ValueError):
    """A job setting that is unknown, out of range, or inconsistent with another."""


@dataclass(frozen=True)
class Limits:
    """What one job and one request may ask of a server: hostile or mistaken requests are
    refused up front, before any work in proportion to what they claim.

    Ids (job, worker, client session) and tensor names are at most :attr:`max_id_chars` /
    :attr:`max_name_chars` characters, all printable (``str.isprintable``: no control
    characters such as below U+0020, U+007F or U+0080..U+009F, no line or paragraph
    separators, no format or unassigned characters; the plain space is allowed). A clock
    or version a client sends is at most :attr:`max_clock`. A push or init stream carries
    at most the bytes its job's parts on this server take, in at most one chunk per part
    plus one per :attr:`chunk_grain_bytes` of them.
    """

    max_tensors: int = 100_000
    max_rank: int = 8
    max_model_bytes: int = 64 << 30  # the whole model, every server's share together
    max_parts: int = 1_000_000
    max_servers: int = 1024
    max_id_chars: int = 256  # a job id, worker id or client session id
    max_workers: int = 10_000  # worker ids a job may hold on a server (Status lists them all)
    max_name_chars: int = 1024  # a tensor name
    max_config_bytes: int = 16 << 20  # a serialized JobConfig (Status replies carry it)
    max_clock: int = 1 << 62  # a push's clock and pulled_version, a pull's clock, min_version
    chunk_grain_bytes: int = 32  # a stream's chunks: one per part plus one per this many bytes
    digest_chars: int = 64  # a layout digest (this project's are 16)
    max_kept_bytes: int = 1 << 30  # delay compensation: pulled weights a server keeps

    def check_id(self, name: str, value: str, empty: bool = True) -> None:
        """A JobError if an id is longer than :attr:`max_id_chars`, not printable, or empty
        (unless allowed). The length is checked first: a huge id costs nothing more."""
        self._check_text(name, value, self.max_id_chars)
        if not value and not empty:
            raise JobError(f"{name} is empty")

    def check_name(self, name: str, value: str) -> None:
        """A JobError if a tensor name is empty, too long or not printable."""
        self._check_text(name, value, self.max_name_chars)
        if not value:
            raise JobError(f"{name} is empty")

    def check_clock(self, name: str, value: int) -> None:
        """A JobError if a clock or version is over :attr:`max_clock`."""
        if value > self.max_clock:
            raise JobError(f"{name} {value} is over the limit {self.max_clock}")

    @staticmethod
    def _check_text(name: str, value: str, limit: int) -> None:
        if len(value) > limit:
            raise JobError(f"{name} has {len(value)} characters; the limit is {limit}")
        if not value.isprintable():
            bad = next(c for c in value if not c.isprintable())
            raise JobError(
                f"{name} {value!r} has the character U+{ord(bad):04X}: ids and names must be "
                "printable (no control characters)"
            )

"""The errors of files: one that does not fit what it is loaded into, one that cannot be what it
claims to be."""

from __future__ import annotations

import json
from typing import Any

_SHOWN = 25  # entries listed per category in a message; the exception holds all of them
ABSENT = "<absent>"


class CheckpointMismatchError(ValueError):
    """A file (weights, masks, a checkpoint) does not match the model, the run or the target.

    Raised by the weight importer and exporter (missing, unexpected or mis-shaped keys), by the
    masks reader, and by `Checkpointer.restore` (a checkpoint of another run, or of another state
    layout). A partial load is never silent: every differing key is listed.

    Attributes:
      fields: `(field, in the file, now)` for every differing identity field of a checkpoint
        (dotted paths into the identity dict, e.g. `budget.conv1/kernel`).
      missing: keys (or leaves) that are wanted and the file lacks.
      unexpected: keys of the file that have no place in what it is loaded into.
      mismatched: `(key, in the file, wanted)` for every shape or dtype disagreement.
    """

    def __init__(
        self,
        subject: str,
        *,
        fields: list[tuple[str, Any, Any]] = (),
        missing: list[str] = (),
        unexpected: list[str] = (),
        mismatched: list[tuple[str, Any, Any]] = (),
        hint: str | None = None,
    ):
        self.fields = list(fields)
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        if self.missing or self.unexpected or self.mismatched:
            subject += (
                f": {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.mismatched)} mismatched"
            )
        lines = [subject]
        for name, saved, now in self.fields[:_SHOWN]:
            lines.append(f"  {name}: checkpoint {_show(saved)}, now {_show(now)}")
        if len(self.fields) > _SHOWN:
            lines.append(f"  ... and {len(self.fields) - _SHOWN} more field(s)")
        lines += _listing("missing", self.missing)
        lines += _listing("unexpected", self.unexpected)
        lines += _listing(
            "shape/dtype mismatches (file vs wanted)",
            [f"{k}: {_shape(got)} vs {_shape(want)}" for k, got, want in self.mismatched],
        )
        if hint:
            lines.append(f"  hint: {hint}")
        super().__init__("\n".join(lines))


class FileContentError(ValueError):
    """A file cannot be read as what it claims to be, or holds values that cannot be meant.

    Raised by the readers of weights, masks and batch-norm statistics for an empty, truncated or
    foreign file (not the format its suffix names), for non-finite pre-trained weights, and for a
    mask that holds values other than 0 and 1. The message names the file, the entry, and what to
    do about it.
    """


class MissingDependencyError(ImportError):
    """A file needs an optional package that is not installed (PyTorch for a `.pth` file).

    The message names the file, the package and the alternatives (install it, or convert the file
    to a format that needs nothing more).
    """


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return [f"  {title}: " + ", ".join(items[:_SHOWN]) + more]


def _shape(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _show(value: Any) -> str:
    if value is ABSENT:
        return value
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 200 else text[:197] + "..."

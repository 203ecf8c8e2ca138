"""The one error type of single-file and LoRA loading."""

from ..loading import WeightLoadError


class SingleFileError(WeightLoadError):
    """A single-file checkpoint (or LoRA) does not fit what it is loaded into; the message names the file and keys."""


def listed(title: str, keys, limit: int = 20) -> str:
    keys = sorted(keys)
    shown = keys[:limit] + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])
    return f"{len(keys)} {title}:\n  " + "\n  ".join(shown)

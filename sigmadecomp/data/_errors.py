"""One helper for the loaders' file errors, so every message names the file and its format."""

from __future__ import annotations

import pathlib


def require_file(path: pathlib.Path, fmt: str) -> pathlib.Path:
    """``path`` if it is a file; else ``FileNotFoundError`` naming it and the expected format."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; expected {fmt}. Check the directory argument "
            f"(it should be the folder holding the official files)."
        )
    return path


def corrupt(path: pathlib.Path, fmt: str, detail: str) -> ValueError:
    """The ``ValueError`` for a file that exists but is not valid ``fmt``."""
    return ValueError(f"{path} is not {fmt}: {detail}. Re-download the official file.")

"""Which folder the phantom may write into: an empty one, or one it marked as its own.

Kept apart from :mod:`physis.phantom` (NumPy, pandas, PIL) because the workflow checks
``dataset.root`` while Snakemake parses it, where only the standard library is at hand.
"""

from __future__ import annotations

from pathlib import Path

#: Written first into every folder the phantom fills; the phantom writes only where it finds this
#: file or an empty folder, so it can never overwrite a user's own data set.
MARKER = ".physis-phantom"


class PhantomFolderError(ValueError):
    """The target folder holds files the phantom did not write."""


def check_folder(root: Path) -> None:
    """Raise :class:`PhantomFolderError` unless ``root`` is missing, empty or marked as the phantom's."""
    root = Path(root)
    if (root / MARKER).is_file() or not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    raise PhantomFolderError(
        f"{root} holds files the phantom did not write (no {MARKER} marker), and the phantom writes only into "
        "an empty folder or one it created. If this is your data set, set dataset.phantom.enabled: false; "
        "otherwise choose an empty folder for the phantom.")

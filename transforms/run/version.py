"""The version a manifest, a card and a trainer summary record: the package version plus
the git commit when running from a checkout. No Beam: the trainer imports it."""

from __future__ import annotations

import os
import subprocess

__version__ = "0.1.0"


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+g{sha}" if sha else __version__

"""What code a benchmark ran: the commit of its checkout and the library files that differ from it."""

import os
import subprocess


def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def commit():
    """The checkout's commit, short; "unknown" outside a git checkout. Read it when the run starts: a
    later commit is not what ran."""
    return _git("rev-parse", "--short", "HEAD")


def provenance():
    """The commit and the library files that differ from it."""
    changed = _git("status", "--porcelain", "--", "tas_keras", "train", "export")
    return {"commit": commit(),
            "uncommitted": sorted(line[3:] for line in changed.splitlines()) if changed != "unknown" else []}

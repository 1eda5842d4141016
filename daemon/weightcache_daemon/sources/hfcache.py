"""Hugging Face cache snapshots as file:// sources, for the admin (docs/sources.md).

A snapshot of the Hugging Face cache is a directory of links into its repository's blobs:

    <hub>/models--org--name/
        blobs/<etag>                                   the bytes (regular files)
        snapshots/<revision>/config.json -> ../../blobs/<etag>
        snapshots/<revision>/sub/x.json  -> ../../../blobs/<etag>

A link is followed only when its text alone proves where it leads: relative, exactly as many
``..`` as climb from the link's own directory to ``models--org--name/`` (one per directory of
the file inside the snapshot, plus ``snapshots/<revision>``), then ``blobs/``, then one
name. The blob is then opened by walking from ``/`` to that repository's ``blobs/`` without
following any link on the way (``O_NOFOLLOW`` at each step, ``O_NOFOLLOW`` on the blob), so a
``..`` is only ever taken through real directories, and no other link (an intermediate
directory, ``blobs`` itself, the blob itself, a link to another snapshot or another
repository) is followed. Client requests follow no link at all: a client must not be able to
make the daemon read a file because a link points at it.
"""

from __future__ import annotations

from pathlib import PurePosixPath

__all__ = ["LINK_ADVICE", "blob_name", "repo_of"]

LINK_ADVICE = (
    "copy the directory with its files instead of links (cp -rL SRC DST), or download the model with "
    "`hf download ORG/NAME --local-dir DIR`"
)


def repo_of(root: PurePosixPath) -> PurePosixPath | None:
    """The repository folder (``…/models--org--name``) when root is one of its snapshots."""
    parts = root.parts
    if len(parts) >= 4 and parts[-2] == "snapshots" and parts[-3].startswith("models--") and parts[-1] not in ("", "."):
        return root.parent.parent
    return None


def blob_name(target: str, depth: int) -> str | None:
    """The blob a link's text names, if it is (depth + 2) times ``../``, then ``blobs/<name>``; else None.
    depth: directories between the snapshot root and the link (0 for a file at its root)."""
    parts = target.split("/")
    ups = depth + 2
    if len(parts) != ups + 2 or any(p != ".." for p in parts[:ups]) or parts[ups] != "blobs":
        return None
    name = parts[-1]
    if name in ("", ".", "..") or "\x00" in name:
        return None
    return name

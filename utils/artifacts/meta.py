"""Reading an artifact's meta.json: the one entry every stage's reader starts from.

It lives above `utils.io` and `utils.locking` because a directory that is not there yet may be being written by
another run, whose lock names it (`utils.locking.lock_holder`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from utils.io import META_NAME, ArtifactError, check_fields, partial_path, read_meta_file
from utils.locking import describe_owner, lock_holder


def read_meta(directory: str | os.PathLike, kind: str, fields: Iterable[str] = ()) -> dict:
    """Read and check ``<directory>/meta.json`` of an artifact of the given ``kind``.

    ``kind`` is the artifact type recorded by its writer ("dataset", "datastore", ...); ``fields`` are the
    entries its reader needs. Raises `ArtifactError` with a message that says what to do when the
    directory is missing, still being written (its writer holds the lock: `utils.locking.lock_holder`) or
    left by an interrupted run, holds another kind of artifact, or its meta.json is not JSON or lacks a field.
    """
    directory = Path(directory)
    if not directory.exists():
        staging = partial_path(directory)
        if staging.exists():
            if (owner := lock_holder(directory)) is not None:
                raise ArtifactError(f"{directory} is not finished: another run is writing it now "
                                    f"({describe_owner(owner or None)}) in {staging}. Wait for it to finish; do not "
                                    "delete that directory.")
            raise ArtifactError(
                f"{directory} is incomplete: its stage was interrupted and left {staging}. "
                "Rerun the same command to resume, or delete that directory to start over."
            )
        raise ArtifactError(f"{directory} does not exist (expected a {kind} directory).")
    meta_file = directory / META_NAME
    if not meta_file.is_file():
        raise ArtifactError(f"{directory} has no {META_NAME}: it is not a {kind} made by this project.")
    meta = read_meta_file(meta_file, f"the JSON description of a {kind}")
    if meta.get("kind") != kind:
        raise ArtifactError(f"{directory} holds a {meta.get('kind')!r} artifact, expected a {kind!r}.")
    check_fields(meta, fields, meta_file)
    return meta

"""An exclusive lock on every artifact a stage writes, held for the stage's whole run.

Two runs writing one artifact would interleave or, worse, finish with a directory that looks complete
and mixes both: the second run wipes the first's ``<dir>.partial`` and renames it as its own. So every
stage that writes an artifact runs inside `artifact_lock` (or `artifact_locks` for several):

* the lock is the hidden file ``.<name>.lock`` beside the artifact ``<name>`` (the artifact and its staging
  directory may not exist yet), taken with `filelock` (``flock``: the kernel drops it when its process dies,
  however it dies);
* the holder is recorded beside it in ``.<name>.lock.owner.json``: host, pid, command line, start time;
* a second run is refused at once (timeout 0) with an `ArtifactError` naming the flag, the path and the
  owner, before it creates, wipes or stages anything;
* an owner record found by a run that did get the lock was left by a run that never released it (it was
  killed): the lock is taken over with a warning naming that run, and whether its process is dead;
* on release the owner record is removed (the lock file stays: waiters must share its inode);
* the lock belongs to the directory, not to its spelling: the path is resolved first (symbolic links, ``..``),
  so ``out`` and a link to it share one lock;
* once the lock is held, no symbolic link may sit where the stage writes (`refuse_links`): the artifact's
  staging directory ``<name>.partial`` and anything inside it or inside the artifact. A run never writes
  through a link into a file outside its output (the artifact path itself, or a directory above it, may be a
  link: it is resolved);
* a full disk met while the lock is held ends in one `DiskFullError` naming the file and the free space
  (`utils.io.reporting_full_disk`), not in a library's traceback.

A reader that meets ``<name>.partial`` without ``<name>`` asks `lock_holder` whether a run is writing it now.

Under ``accelerate launch`` only the main process takes the lock, before anything else; then all processes
wait for it (``state.wait_for_everyone()``). A refused lock raises on the main process, which exits with
status 2; torchrun then ends the other processes, which are waiting for it.

    with artifact_lock(args.output_dir, "--output_dir", state):
        ...  # the whole stage
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path

from filelock import FileLock, Timeout

from utils.io import ArtifactError, check_writable, partial_path, read_json, reporting_full_disk, write_json

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
OWNER_SUFFIX = ".lock.owner.json"
OWNER_WAIT_SECONDS = 2.0  # the owner writes its record just after taking the lock: how long a refused run waits for it


def resolved(path: str | os.PathLike) -> Path:
    """The real path of an artifact: absolute, with symbolic links and ``..`` resolved as far as the path exists (the
    same directory named through a link gets the same lock)."""
    return Path(path).expanduser().resolve()


def lock_file(path: str | os.PathLike) -> Path:
    """The lock of the artifact ``path``: the hidden file ``.<name>.lock`` beside its real path (hidden, so that globs
    such as ``qa_validation/lmbda_*`` still list artifacts only)."""
    path = resolved(path)
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


def owner_file(path: str | os.PathLike) -> Path:
    """Who holds the lock of ``path``: ``.<name>.lock.owner.json`` beside its real path."""
    path = resolved(path)
    return path.with_name(f".{path.name}{OWNER_SUFFIX}")


def this_owner(path: str | os.PathLike, flag: str) -> dict:
    """The owner record of this process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": shlex.join(sys.orig_argv),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"), "flag": flag,
            "path": str(resolved(path))}


def describe_owner(owner: dict | None) -> str:
    if owner is None:
        return "owner unknown: no owner record"
    command = str(owner.get("command")).replace("\n", "\\n")  # the error stays on one line
    return f"host {owner.get('host')}, pid {owner.get('pid')}, command `{command}`, started {owner.get('started')}"


def read_owner(path: str | os.PathLike, wait_seconds: float = 0.0) -> dict | None:
    """The owner record of ``path``'s lock, waiting up to ``wait_seconds`` for it to appear; None if there is none."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return read_json(owner_file(path))
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


def lock_holder(path: str | os.PathLike) -> dict | None:
    """The owner record of the run holding the lock of ``path`` now (``{}`` if it left none yet), or None when no
    run holds it. Probes with a shared ``flock`` on the lock file, released at once; nothing is created."""
    lock_path = lock_file(path)
    try:
        import fcntl
    except ImportError:  # not a POSIX system: cannot tell
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:  # no lock file: no run ever locked it here
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_owner(path, OWNER_WAIT_SECONDS) or {}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def refuse_links(path: str | os.PathLike, flag: str) -> None:
    """Fail if a symbolic link sits where a stage writes the artifact ``path``: its staging directory
    ``<name>.partial``, or any entry inside it or inside the artifact (a run would write through the link into a
    file elsewhere, or trip over it when it replaces the directory). Links are not followed."""
    path = resolved(path)
    staging = partial_path(path)
    for root in (path, staging):
        if root.is_symlink():  # only the staging directory can be: `resolved` followed the artifact's own link
            raise ArtifactError(f"{flag} {path}: {root} is a symbolic link (to {os.readlink(root)}); a stage writes its "
                                "staging directory itself, never through a link. Remove the link and rerun.")
        if not root.is_dir():
            continue
        for directory, subdirectories, files in os.walk(root):
            for name in sorted(subdirectories + files):
                entry = Path(directory) / name
                if entry.is_symlink():
                    raise ArtifactError(f"{flag} {path}: {entry} is a symbolic link (to {os.readlink(entry)}); a stage "
                                        "never writes through a link into a file outside its output. Remove the link "
                                        "(or choose another output) and rerun.")


def process_is_dead(owner: dict) -> bool:
    """Whether the owner's process is known to be gone: it ran on this host and no process has its pid."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user has that pid
        return False
    return False


def take_over(path: str | os.PathLike, flag: str, left: dict) -> None:
    """Warn that the lock was left by a run that never released it (its process was killed)."""
    if process_is_dead(left):
        state = f"its process {left['pid']} on this host is dead"
    else:
        state = "it did not release the lock (if it ran on another host, check it is no longer running)"
    logger.warning("Taking over the lock of %s %s left by a run that did not finish (%s): %s",
                   flag, path, describe_owner(left), state)


@contextmanager
def held(path: str | os.PathLike, flag: str) -> Iterator[None]:
    """Hold the lock of the artifact ``path`` (one process; see `artifact_lock`)."""
    lock_path = lock_file(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ArtifactError(
            f"{flag} {path} is being written by another run ({describe_owner(read_owner(path, OWNER_WAIT_SECONDS))}); "
            f"wait for it to finish or stop it. Nothing was changed. Lock: {lock_path}"
        ) from None
    try:
        left = read_owner(path)
        if left is not None:
            take_over(path, flag, left)
        write_json(owner_file(path), this_owner(path, flag))
        refuse_links(path, flag)
        yield
    finally:
        owner_file(path).unlink(missing_ok=True)
        lock.release()


@contextmanager
def artifact_locks(targets: list[tuple[str | os.PathLike | None, str]], state=None) -> Iterator[None]:
    """Hold the locks of several artifacts, given as ``(path, flag)`` pairs (None paths are skipped), for a whole run.

    ``state`` (an ``accelerate`` `PartialState` or `Accelerator`, or None for one process): only the main
    process checks that the paths are writable and takes the locks, then every process waits for it.
    """
    wanted: dict[Path, tuple[str | os.PathLike, str]] = {}
    for path, flag in targets:
        if path is not None:
            wanted.setdefault(resolved(path), (path, flag))  # one directory named twice (or through a link): one lock
    with ExitStack() as stack, reporting_full_disk(list(wanted.values())):
        if state is None or state.is_main_process:
            for path, flag in wanted.values():
                check_writable(path, flag)
            for path, flag in wanted.values():
                stack.enter_context(held(path, flag))
        if state is not None:
            state.wait_for_everyone()
        yield
        if state is not None:
            state.wait_for_everyone()  # no process still writes when the lock goes


def artifact_lock(path: str | os.PathLike | None, flag: str, state=None):
    """Hold the lock of the artifact ``path`` (written by the stage's ``flag``) for a whole run: `artifact_locks`."""
    return artifact_locks([(path, flag)], state)

"""Run directories: what a stage writes where, which run a directory holds, and one run at a time.

Every stage writes into its run directory (`--out`): run.json (the settings of the run it holds, so a
resumed run never mixes two configurations), its artifacts and its backups. On a cluster the chief
writes `out` and every other worker its own `out/workers/<task>` (`run_dir`), so no two processes
write the same file. A run locks the directory it writes when it claims it (`prepare_run_dir`,
`lock_run_dir`) and holds the lock until its stage function returns (`locking_stage`), so a second
run on the same directory is refused at once.
"""

import datetime
import fcntl
import functools
import json
import os
import shutil
import socket
import sys

import tensorflow as tf

from tas_keras.distribute import is_chief, is_multi_worker

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
WORKERS_DIR = "workers"
# What tas_keras.api saves into a run directory before the run starts, from the objects a caller gave
# (the run's settings name these files): an input of the run, so neither its output nor a stranger's file.
GIVEN_FILES = ("source.keras", "teacher.keras", "given_shape.json")


def write_json(path, payload):
    """Atomic: a killed process leaves the old file or none, never half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


class RunMismatchError(ValueError):
    pass


class RunLockedError(ValueError):
    """Another process holds the run directory."""


def run_dir(out):
    """Where this process writes the run `out`: `out` itself on the chief (and on one machine),
    `out/workers/<task>` on the other workers, so no two processes write the same file."""
    if is_chief():
        return out
    resolver = tf.distribute.get_strategy().cluster_resolver
    return os.path.join(out, WORKERS_DIR, f"{resolver.task_type}_{resolver.task_id}")


def check_overwrite(overwrite):
    """Workers start at different moments: one clearing a shared run directory would delete what
    another has begun to write."""
    if overwrite and is_multi_worker():
        raise ValueError("--overwrite is not supported with --strategy=multi_worker: delete the run "
                         "directory before starting the workers")


def holds_own_files(directory):
    """Whether `directory` holds any file besides run locks and given inputs (GIVEN_FILES), outside the
    other workers' directories."""
    for _, subdirectories, files in os.walk(directory):
        if set(files) - {LOCK_FILE, *GIVEN_FILES}:
            return True
        subdirectories[:] = [d for d in subdirectories if d != WORKERS_DIR]
    return False


def clear_run_dir(directory):
    """Deletes everything in `directory` but its lock and given inputs (GIVEN_FILES): the run clearing
    it holds that lock, and a deleted lock file would let a second run lock a new one."""
    for entry in os.scandir(directory):
        if entry.name in (LOCK_FILE, *GIVEN_FILES):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.remove(entry.path)


def prepare_run_dir(out, settings, overwrite=False, *, done_file):
    """Claims `out` for a run with `settings`; returns (the directory this process writes, whether
    the run already finished: `out` holds `done_file`, its last artifact).

    A directory holding a different run (other settings) is refused unless `overwrite`, so a finished
    result is never replaced by accident and a resumed run never mixes two configurations. The
    directory written is `out` itself except on the non-chief workers of a cluster (`run_dir`); it is
    locked first (`lock_run_dir`): a directory another run holds is refused (RunLockedError).
    """
    check_overwrite(overwrite)
    run = run_dir(out)
    run_file = os.path.join(run, RUN_FILE)
    lock_run_dir(run)
    if overwrite:
        clear_run_dir(run)
    if os.path.exists(run_file):
        previous = read_json(run_file)
        changed = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise RunMismatchError(f"{out} holds a different run ({details}); use another --out or "
                                   "pass --overwrite")
        return run, os.path.exists(os.path.join(out, done_file))
    if holds_own_files(run):
        raise RunMismatchError(f"{out} is not empty and holds no run of this tool; use another --out "
                               "or pass --overwrite")
    write_json(run_file, settings)
    return run, False


class RunLock:
    """An exclusive lock on a run directory, between `acquire` and `release`.

    The lock is `fcntl.flock` on `<directory>/run.lock`, which also records the holder (pid, host,
    start time, command) for the message that refuses a second run. The kernel releases a flock when
    its holder exits in any way, SIGKILL included, so the run that follows a killed one takes the
    directory over and resumes it. On NFS, Linux maps flock to NFS locks, which the server releases
    when the holder's machine stops renewing them.
    """

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._file = None

    def acquire(self):
        os.makedirs(self.directory, exist_ok=True)
        lock = open(self.path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            raise RunLockedError(f"{self.directory} is in use by another run ({_describe(holder)}); "
                                 "wait for it to end, stop it, or use another --out") from None
        lock.seek(0)
        lock.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "command": " ".join(sys.argv)}, lock)
        lock.flush()
        self._file = lock
        return self

    def release(self):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def _describe(holder):
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        # The holder locks before it writes: this is the instant between the two.
        return "a process that is just starting"


_held_locks = {}  # real path of a run directory -> the RunLock this process holds on it


def lock_run_dir(directory):
    """Creates `directory` if needed and locks it until the enclosing `locking_stage` function
    returns (or the process ends); a directory this process already holds stays held."""
    key = os.path.realpath(directory)
    if key not in _held_locks:
        _held_locks[key] = RunLock(directory).acquire()


def locking_stage(stage):
    """Releases, when the stage function returns or raises, the run directories it locked."""

    @functools.wraps(stage)
    def run(*args, **kwargs):
        held_before = set(_held_locks)
        try:
            return stage(*args, **kwargs)
        finally:
            for key in set(_held_locks) - held_before:
                _held_locks.pop(key).release()

    return run

"""Writing files and folders so that a reader never sees half of one; orbax without its chatter.

Every result, index, state folder and checkpoint of value_jax is written through here:

  write_atomic(path, data)       a file: temporary file in the same folder, then one rename
  replace_dir(tmp, final)        a finished temporary folder takes the place of `final`
  quiet_orbax()                  orbax logs each save step at INFO; this keeps WARNING and above
  local_checkpointer()           an orbax checkpointer acting for this process alone

This module imports nothing of value_jax, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same directory and a rename.

    The file gets the permissions the umask allows (as `open` would give), not mkstemp's 0600.
    On any error, the temporary file is removed and `path` is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}-{os.path.basename(path)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj, **dump_kwargs) -> None:
    """`write_atomic(path, json.dumps(obj, **dump_kwargs))`."""
    write_atomic(path, json.dumps(obj, **dump_kwargs))


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Moves the finished folder `tmp` to `final`, replacing what is there.

    The old folder is first renamed aside (`final.old`), then `tmp` takes its place, then the old
    one is deleted: at every moment `final` is either the old complete folder or the new one.
    """
    tmp, final = os.fspath(tmp), os.fspath(final)
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def quiet_orbax():
    """orbax logs every step of a save at INFO; a progress line per checkpoint is enough here."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(min(level, absl_logging.WARNING))  # lower = quieter in absl
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def local_checkpointer():
    """An orbax checkpointer acting for this process alone: the state is the same on every
    process, and only one writes it (no barrier with processes that do not take part)."""
    import jax
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"p{me}"
        )
    )

"""Checkpoint URI -> local path, the one way every service does it.

Local paths and `file://` URIs are used in place. Any other fsspec URL (s3://, gs://, memory://, ...)
is copied once into `cache_dir/<cache_key(uri)>` and reused: the copy goes to a temporary sibling
that is renamed into place only when complete (so a crashed download is never mistaken for a
checkpoint) and removed when the copy fails. After each new download the cache keeps only its
`keep` most recently used entries, so a long-running service does not fill its disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

DEFAULT_KEEP = 4


def is_local(uri: str | os.PathLike[str]) -> bool:
    return urlparse(str(uri)).scheme in ("", "file")


def local_file_path(uri: str | os.PathLike[str]) -> Path:
    """The path of a local path or file:// URI (no existence check)."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme:
        raise ValueError(f"{text!r} is not a local path or file:// URI")
    return Path(text).expanduser()


def cache_key(uri: str) -> str:
    """The cache entry of a remote URI: a hash of the URI itself (stable across processes)."""
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def resolve(uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str], *, keep: int = DEFAULT_KEEP) -> Path:
    """A local path with the contents of `uri` (a directory or a single file)."""
    text = str(uri)
    if is_local(text):
        path = local_file_path(text)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    import fsspec

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    directory, single_file = cache / cache_key(text), cache / (cache_key(text) + ".file")
    if not directory.exists() and not single_file.exists():
        fs, remote = fsspec.core.url_to_fs(text)
        if not fs.exists(remote):
            raise FileNotFoundError(f"checkpoint {text} does not exist")
        target = directory if fs.isdir(remote) else single_file
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
        try:
            if target is directory:
                fs.get(remote.rstrip("/") + "/", str(staging), recursive=True)
            else:
                fs.get(remote, str(staging / Path(remote).name))
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if not target.exists():  # else another process finished the same download first
                raise
        prune(cache, keep=keep, protect={target})
    if directory.exists():
        os.utime(directory)  # most recently used
        return directory
    os.utime(single_file)
    return next(single_file.iterdir())


def prune(cache_dir: str | os.PathLike[str], *, keep: int, protect: set[Path] = frozenset()) -> list[Path]:
    """Delete all but the `keep` most recently used complete entries of `cache_dir`."""
    cache = Path(cache_dir)
    if keep <= 0 or not cache.is_dir():
        return []
    entries = sorted((p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for path in entries[keep:]:
        if path not in protect:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed

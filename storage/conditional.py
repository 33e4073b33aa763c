"""Compare-and-swap for a bank's small control files: the live manifest, the bank lock.

    got = read_versioned(path)              # (content, version token) or None
    write_if(path, data, expect=token)      # only if still that version (None: only if absent)
    remove_if(path, expect=token)           # only if still that version

Two rebuilds, or a rebuild and a compaction, must not publish over each other, and two takers
of a lock must not both win. On S3 these are conditional requests decided by the store itself:
`If-None-Match: *` and `If-Match: <ETag>` on PutObject (AWS since August 2024), `If-Match` on
DeleteObject; the token is the ETag. A store that ignores those headers gives no such guarantee
(say so to whoever runs a bank there). Locally the compare and the rename happen under an flock
on a hidden sidecar file `.<name>.cas`, so writers through this module exclude each other;
readers need no lock (a rename is atomic). Other object stores (gs://, az://) are refused by
name: their preconditions are spelled differently and are not implemented here.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

from model.errors import M3Error
from storage.layout import upath
from storage.staging import write_bytes_atomic


class PreconditionFailed(M3Error, RuntimeError):
    """A conditional write found the file changed, present, or gone since it was read."""


def _local(path) -> bool:
    return getattr(path, "protocol", "") in ("", "file", "local")


def _s3(path):
    if getattr(path, "protocol", "") not in ("s3", "s3a"):
        raise M3Error(
            f"{path}: conditional writes (the live manifest, the bank lock) are implemented "
            f"for local paths and s3:// only"
        )
    bucket, key, _ = path.fs.split_path(path.path)
    return path.fs, bucket, key


def _refused(e: OSError) -> bool:
    """Whether s3fs's error is the store refusing a condition: 412; 409 when two conditional
    writes of one key race on AWS; 404 for If-Match on an object that is gone."""
    code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404") or isinstance(
        e, (FileExistsError, FileNotFoundError)
    )


def _token(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def _local_cas(path):
    import fcntl

    path = Path(path.path) if getattr(path, "protocol", "") == "file" else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.cas"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        yield path


def read_versioned(path) -> tuple[bytes, str] | None:
    """(content, version token) of a small file, or None if there is none."""
    path = upath(path)
    if _local(path):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data, _token(data)
    from fsspec.asyn import sync

    fs, bucket, key = _s3(path)

    async def get():  # one GET: the body and the ETag of the same object
        r = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        return await r["Body"].read(), r["ETag"]

    try:
        return sync(fs.loop, get)
    except FileNotFoundError:
        return None


def write_if(path, data: bytes, expect: str | None) -> str:
    """Write `data` whole only if the file is still version `expect` (None: only if there is
    none); returns the new version token, or raises PreconditionFailed."""
    path = upath(path)
    if _local(path):
        with _local_cas(path) as p:
            current = read_versioned(p)
            if (current[1] if current else None) != expect:
                raise PreconditionFailed(f"{path} changed since it was read" if expect else f"{path} exists")
            write_bytes_atomic(p, data)
            return _token(data)
    fs, bucket, key = _s3(path)
    cond = {"IfMatch": expect} if expect else {"IfNoneMatch": "*"}
    try:
        out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
    except OSError as e:
        if _refused(e):
            raise PreconditionFailed(f"{path} changed since it was read" if expect else f"{path} exists") from None
        raise
    finally:
        fs.invalidate_cache(path.path)
    return out["ETag"]


def remove_if(path, expect: str) -> bool:
    """Remove the file only if it is still version `expect`; False if it changed or is gone."""
    path = upath(path)
    if _local(path):
        with _local_cas(path) as p:
            current = read_versioned(p)
            if current is None or current[1] != expect:
                return False
            p.unlink()
            return True
    fs, bucket, key = _s3(path)
    try:
        fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=expect)
    except OSError as e:
        if _refused(e):
            return False
        raise
    finally:
        fs.invalidate_cache(path.path)
    return True

"""A small S3-compatible object server that keeps every object as a file:
the storage of the durable embedded broker.

Tansu 0.6.0 stores either in memory or in an S3 bucket. Its S3 storage keeps
each partition's high watermark in an object that it updates with
conditional writes (If-Match on the ETag it read; If-None-Match: * to
create): a refused write (412) makes it reread the watermark. A server that
ignores those headers (s3rver 3.7.1 does) lets a restarted broker write new
records at offset 0 over the old ones. So this server implements exactly
what Tansu needs, and does it carefully:

- PUT (with If-Match / If-None-Match and x-amz-copy-source), GET (with Range,
  If-Match, If-None-Match), HEAD, DELETE, ListObjectsV2, bucket HEAD/PUT;
- a write goes to a temporary file that is renamed over the old one, under
  one lock with its precondition check: an acknowledged write survives a
  crash of this process or of the broker. With `--fsync` the file and its
  folder are also fsync'ed before the answer, so it survives a power loss
  too (about 10 ms per write on a common disk; Apache Kafka does not fsync
  per write by default either).

It listens on loopback only and checks no signatures: it is the private disk
of one broker, not a general S3 service.

`python -m services.common.objectstore --dir DIR --port PORT [--bucket tansu] [--fsync]`
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

ETAG_CACHE = 4096
SUFFIX = ".obj"  # object files carry it, so a key and a longer key's folder never collide
XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


class S3Error(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


class Store:
    """Buckets as folders under `root`, objects as files, writes atomic and durable."""

    def __init__(self, root: Path, fsync: bool = False):
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # a precondition and its write happen as one step
        self._last_ns = 0  # modification times strictly increase in write order (see _iso)
        # ETags of recently written objects, so a conditional write needs no reread (bounded).
        self._etags: OrderedDict[Path, str] = OrderedDict()

    def bucket(self, name: str) -> Path:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,62}", name):
            raise S3Error(400, "InvalidBucketName", f"bad bucket name {name!r}")
        return self.root / name

    def path(self, bucket: str, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
            raise S3Error(400, "InvalidArgument", f"unsupported key {key!r}")
        base = self.bucket(bucket)
        if not base.is_dir():
            raise S3Error(404, "NoSuchBucket", f"no bucket {bucket!r}")
        return base.joinpath(*parts[:-1], parts[-1] + SUFFIX)

    def etag(self, path: Path) -> str | None:
        known = self._etags.get(path)
        if known is not None:
            return known
        try:
            return _etag(path.read_bytes())
        except FileNotFoundError:
            return None

    @staticmethod
    def check(current: str | None, if_match: str | None, if_none_match: str | None) -> None:
        if if_match is not None and (current is None or if_match.strip() not in (current, "*")):
            raise S3Error(412, "PreconditionFailed", "If-Match does not match the object's ETag")
        if if_none_match is not None and current is not None:
            if if_none_match.strip() == "*" or if_none_match.strip() == current:
                raise S3Error(412, "PreconditionFailed", "the object exists (If-None-Match)")

    def put(self, bucket: str, key: str, data: bytes, if_match=None, if_none_match=None) -> str:
        path = self.path(bucket, key)
        with self._lock:
            self.check(self.etag(path), if_match, if_none_match)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(".tmp-" + path.name)  # one writer at a time (the lock)
            try:
                with open(tmp, "wb") as out:
                    out.write(data)
                    if self.fsync:
                        out.flush()
                        os.fsync(out.fileno())
                stamp = self._last_ns = max(time.time_ns(), self._last_ns + 1000)
                os.utime(tmp, ns=(stamp, stamp))
                os.replace(tmp, path)
            except BaseException:
                self._etags.pop(path, None)
                tmp.unlink(missing_ok=True)
                raise
            if self.fsync:
                _fsync_dir(path.parent)
            etag = self._etags[path] = _etag(data)
            self._etags.move_to_end(path)
            if len(self._etags) > ETAG_CACHE:
                self._etags.popitem(last=False)
        return etag

    def get(self, bucket: str, key: str) -> tuple[bytes, str, int]:
        path = self.path(bucket, key)
        try:
            data = path.read_bytes()
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            raise S3Error(404, "NoSuchKey", f"no object {key!r}") from None
        return data, _etag(data), mtime

    def delete(self, bucket: str, key: str) -> None:
        path = self.path(bucket, key)
        with self._lock:
            path.unlink(missing_ok=True)
            self._etags.pop(path, None)

    def list(self, bucket: str, prefix: str, delimiter: str, start_after: str) -> tuple[list, list]:
        base = self.bucket(bucket)
        if not base.is_dir():
            raise S3Error(404, "NoSuchBucket", f"no bucket {bucket!r}")
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = Path(dirpath).relative_to(base)
            for name in filenames:
                if name.endswith(SUFFIX) and not name.startswith(".tmp-"):
                    key = "/".join([*rel.parts, name[: -len(SUFFIX)]])
                    if key.startswith(prefix) and key > start_after:
                        keys.append((key, Path(dirpath) / name))
        keys.sort()
        contents, prefixes = [], []
        for key, path in keys:
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                common = prefix + rest.split(delimiter, 1)[0] + delimiter
                if not prefixes or prefixes[-1] != common:
                    prefixes.append(common)
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            contents.append((key, stat.st_size, stat.st_mtime_ns, self.etag(path)))
        return contents, prefixes


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iso(ns: int) -> str:
    """RFC 3339 with microseconds: Tansu takes a partition's newest batch by LastModified."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns // 1000 % 10**6:06d}Z"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client, no handshake per write
    # Headers and body go out as two writes; with Nagle's algorithm the body waits for the
    # client's delayed ACK of the headers (~30 ms a request, measured: reading 900 one-record
    # batches took 27 s), which made every broker fetch that slow.
    disable_nagle_algorithm = True
    server_version = "rlhf-objectstore"
    store: Store

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request would dominate the broker's log

    # --- request parsing ---------------------------------------------------------------
    def _target(self) -> tuple[str, str, dict[str, list[str]]]:
        url = urlsplit(self.path)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        return bucket, key, parse_qs(url.query, keep_blank_values=True)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))

    # --- responses -------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, err: S3Error) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{err.code}</Code>'
            f"<Message>{escape(str(err))}</Message></Error>"
        ).encode()
        self._send(err.status, body, {"Content-Type": "application/xml"})

    def _handle(self, action) -> None:
        try:
            action()
        except S3Error as err:
            self._error(err)

    # --- methods ---------------------------------------------------------------------------
    def do_PUT(self) -> None:
        self._handle(self._put)

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_HEAD(self) -> None:
        self._handle(self._get)

    def do_DELETE(self) -> None:
        self._handle(self._delete)

    def do_POST(self) -> None:
        self._body()
        self._error(S3Error(501, "NotImplemented", "multipart uploads and batch deletes are not supported"))

    def _put(self) -> None:
        bucket, key, _ = self._target()
        data = self._body()
        if not key:
            self.store.bucket(bucket).mkdir(parents=True, exist_ok=True)
            self._send(200)
            return
        source = self.headers.get("x-amz-copy-source")
        if source:
            src_bucket, _, src_key = unquote(source).lstrip("/").partition("/")
            data, _, _ = self.store.get(src_bucket, src_key)
        etag = self.store.put(bucket, key, data, self.headers.get("If-Match"), self.headers.get("If-None-Match"))
        if source:
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?><CopyObjectResult><ETag>{escape(etag)}</ETag>'
                f"<LastModified>{_iso(time.time_ns())}</LastModified></CopyObjectResult>"
            ).encode()
            self._send(200, body, {"ETag": etag, "Content-Type": "application/xml"})
        else:
            self._send(200, b"", {"ETag": etag})

    def _get(self) -> None:
        bucket, key, query = self._target()
        if not key:
            if self.command == "HEAD" or "list-type" not in query and "prefix" not in query:
                if not self.store.bucket(bucket).is_dir():
                    raise S3Error(404, "NoSuchBucket", f"no bucket {bucket!r}")
                if self.command == "HEAD":
                    self._send(200)
                    return
            self._list(bucket, query)
            return
        data, etag, mtime = self.store.get(bucket, key)
        headers = {"ETag": etag, "Last-Modified": formatdate(mtime / 1e9, usegmt=True), "Accept-Ranges": "bytes"}
        if_match, if_none_match = self.headers.get("If-Match"), self.headers.get("If-None-Match")
        if if_match is not None and if_match.strip() not in (etag, "*"):
            raise S3Error(412, "PreconditionFailed", "If-Match does not match the object's ETag")
        if if_none_match is not None and if_none_match.strip() in (etag, "*"):
            self._send(304, b"", headers)
            return
        status, body = 200, data
        wanted = self.headers.get("Range")
        if wanted:
            start, end = _byte_range(wanted, len(data))
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        headers["Content-Type"] = "application/octet-stream"
        if self.command == "HEAD":
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return
        self._send(status, body, headers)

    def _delete(self) -> None:
        bucket, key, _ = self._target()
        self.store.delete(bucket, key)
        self._send(204)

    def _list(self, bucket: str, query: dict[str, list[str]]) -> None:
        def arg(name: str) -> str:
            return query.get(name, [""])[0]

        prefix, delimiter = arg("prefix"), arg("delimiter")
        start_after = arg("continuation-token") or arg("start-after")
        contents, prefixes = self.store.list(bucket, prefix, delimiter, start_after)
        items = "".join(
            f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(mtime)}</LastModified>"
            f"<ETag>{escape(etag or '')}</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            for key, size, mtime, etag in contents
        )
        items += "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes)
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{XMLNS}"><Name>{escape(bucket)}</Name>'
            f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(contents) + len(prefixes)}</KeyCount>"
            f"<MaxKeys>{max(1000, len(contents) + len(prefixes))}</MaxKeys>"
            f"<Delimiter>{escape(delimiter)}</Delimiter><IsTruncated>false</IsTruncated>{items}</ListBucketResult>"
        ).encode()
        self._send(200, body, {"Content-Type": "application/xml"})


def _byte_range(header: str, size: int) -> tuple[int, int]:
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not match or match.groups() == ("", ""):
        raise S3Error(416, "InvalidRange", f"unsupported range {header!r}")
    first, last = match.groups()
    if first == "":
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(size - 1, int(last)) if last else size - 1
    if start > end or start >= size:
        raise S3Error(416, "InvalidRange", f"range {header!r} outside an object of {size} bytes")
    return start, end


def serve(
    root: Path, port: int, host: str = "127.0.0.1", buckets: tuple[str, ...] = (), fsync: bool = False
) -> ThreadingHTTPServer:
    store = Store(root, fsync)
    for name in buckets:
        store.bucket(name).mkdir(parents=True, exist_ok=True)
    handler = type("BoundHandler", (Handler,), {"store": store})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.objectstore", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, type=Path, help="folder that holds the buckets")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket at start (repeatable)")
    parser.add_argument("--fsync", action="store_true", help="fsync every write before answering")
    args = parser.parse_args(argv)
    server = serve(args.dir, args.port, args.host, tuple(args.bucket), args.fsync)
    print(f"objectstore: {args.dir} on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

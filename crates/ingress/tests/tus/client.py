"""Drives Cairn's tus endpoint with the stock PyPI client (tuspy), for crates/ingress/tests/uploads.rs.

Each command prints one JSON object on stdout.

  upload ENDPOINT FILE [--chunk-size N] [--stop-at N] [--store PATH] [--checksum sha1|sha256|wrong]
      Uploads FILE (resuming the upload PATH remembers for it, if any) up to --stop-at bytes, then
      exits: {"url", "offset"}; a refused chunk gives {"error_status", "url"}.
  cut UPLOAD_URL FILE OFFSET SEND
      A raw PATCH at OFFSET announcing the rest of FILE but sending only SEND bytes, then the
      connection is closed mid-body: {"sent"}.
"""
import argparse
import hashlib
import json
import socket
import sys
import time
from urllib.parse import urlsplit

from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError, TusUploadFailed
from tusclient.storage.filestorage import FileStorage
from tusclient.uploader import Uploader


class Sha256Uploader(Uploader):
    CHECKSUM_ALGORITHM_PAIR = ("sha256", hashlib.sha256)


def wrong_sha256(data=b""):
    """A sha256 of other bytes: every checksum it gives is wrong."""
    return hashlib.sha256(b"not the data" + data)


class WrongChecksumUploader(Uploader):
    CHECKSUM_ALGORITHM_PAIR = ("sha256", wrong_sha256)


def upload(args):
    cls = {None: Uploader, "sha1": Uploader, "sha256": Sha256Uploader, "wrong": WrongChecksumUploader}[args.checksum]
    options = dict(
        file_path=args.file,
        chunk_size=args.chunk_size,
        metadata={"filename": "data.bin", "kind": "test"},
        retries=0,
        upload_checksum=args.checksum is not None,
    )
    if args.store:
        options.update(store_url=True, url_storage=FileStorage(args.store))
    uploader = cls(client=tus_client.TusClient(args.endpoint), **options)
    try:
        uploader.upload(stop_at=args.stop_at)
    except (TusUploadFailed, TusCommunicationError) as error:
        print(json.dumps({"error_status": error.status_code, "url": uploader.url}))
        return
    print(json.dumps({"url": uploader.url, "offset": uploader.offset}))


def cut(args):
    with open(args.file, "rb") as f:
        data = f.read()
    rest = len(data) - args.offset
    url = urlsplit(args.upload_url)
    sock = socket.create_connection((url.hostname, url.port))
    head = (
        f"PATCH {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {args.offset}\r\n"
        f"Content-Length: {rest}\r\n\r\n"
    )
    sock.sendall(head.encode())
    sock.sendall(data[args.offset : args.offset + args.send])
    time.sleep(0.5)  # let the server read what was sent before the connection goes
    sock.close()
    print(json.dumps({"sent": args.send}))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload")
    up.add_argument("endpoint")
    up.add_argument("file")
    up.add_argument("--chunk-size", type=int, default=sys.maxsize)
    up.add_argument("--stop-at", type=int)
    up.add_argument("--store")
    up.add_argument("--checksum", choices=["sha1", "sha256", "wrong"])
    c = sub.add_parser("cut")
    c.add_argument("upload_url")
    c.add_argument("file")
    c.add_argument("offset", type=int)
    c.add_argument("send", type=int)
    args = parser.parse_args()
    {"upload": upload, "cut": cut}[args.command](args)


if __name__ == "__main__":
    main()

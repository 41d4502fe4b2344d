"""A small captioned kohya tree, with files outside it reachable only through symlinks, and a running
review server over it; shared by the HTTP and the browser tests."""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from lorafit.review.server import ReviewServer, start_review_server

CAPTIONS = {
    "10_ohwx dog/a.png": "ohwx dog, solo, watermark",
    "10_ohwx dog/nested/b.png": "dog, watermark, grass",
    "1_dog/c.png": None,  # no caption file yet
}
SECRET = "secret caption outside the dataset"


def make_tree(base: Path) -> Path:
    """``base/train`` with three images, and ``base/outside`` linked into it by two symlinks."""
    root = base / "train"
    for index, (relative, text) in enumerate(CAPTIONS.items()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 32), (60 * index, 200 - 60 * index, 90)).save(path)
        if text is not None:
            path.with_suffix(".txt").write_text(text + "\n")
    outside = base / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside / "secret.png")
    (outside / "secret.txt").write_text(SECRET + "\n")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "escape.png").symlink_to(outside / "secret.png")
    return root


@contextlib.contextmanager
def running_server(root: Path, **options) -> Iterator[ReviewServer]:
    server = start_review_server(root, **options)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def request(
    server: ReviewServer, method: str, path: str, body: dict | None = None, headers: dict | None = None
) -> tuple[int, dict | bytes]:
    """One raw HTTP request (http.client sends the path as given: no ``..`` clean-up on the way)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    data = None if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json"} if body is not None else {}
    all_headers.update(headers or {})
    connection.request(method, path, body=data, headers=all_headers)
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, json.loads(payload)
    return response.status, payload

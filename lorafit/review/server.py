"""``lorafit review DIR``: a local web page for checking and fixing captions by hand.

A standard-library HTTP server bound to 127.0.0.1 only (never another interface), on a free port
unless ``--port`` says otherwise. It serves one page whose HTML, JavaScript and CSS live in this
package (no CDN, works offline) and a small JSON API:

* ``GET  /api/items``             every image with its caption text and version
* ``GET  /api/image?id=0/a.png``  the image bytes
* ``POST /api/save``              ``{"changes": [{"id", "text", "version"}]}``; 409 when any file
  changed on disk since the page loaded it (the others are saved), with the current text

Requests are refused unless their ``Host`` header names the loopback address (a web page on
another site cannot reach the server through DNS rebinding). A save must be sent as
``application/json`` (which a cross-site form cannot do without a CORS preflight this server
never grants), with a numeric ``Content-Length`` of at most 16 MiB, and from the page itself: an
``Origin`` header naming any other origin (another site, ``null`` from a sandbox or a file) is
refused. Every connection has a read timeout, so clients that open a request and stall (300 of them
once held 302 threads) are dropped instead of holding a thread each for ever.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import threading
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from lorafit.captioning.dataset_roots import dataset_roots
from lorafit.errors import LorafitError
from lorafit.review.caption_store import CaptionStore, RefusedPath

logger = logging.getLogger("lorafit.review")

LOOPBACK = "127.0.0.1"
# The page's files: a fixed table, so no request path ever reaches the package folder.
STATIC_FILES = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/app.css": ("app.css", "text/css"),
}
MAX_BODY = 16 << 20  # a save of every caption of a large dataset fits; anything larger is not ours
READ_TIMEOUT = 30.0  # seconds a connection may stay silent: the page's requests take milliseconds


def _static(name: str) -> bytes:
    return resources.files("lorafit.review").joinpath("static", name).read_bytes()


class ReviewHandler(BaseHTTPRequestHandler):
    """Serves the page and the API for the :class:`CaptionStore` the server holds."""

    server: ReviewServer
    protocol_version = "HTTP/1.1"

    @property
    def timeout(self) -> float:  # read by StreamRequestHandler.setup() as the socket's timeout
        return self.server.read_timeout

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _host_allowed(self) -> bool:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        return host in (LOOPBACK, "localhost")

    def _origin_allowed(self) -> bool:
        """No Origin (not a browser), or the page's own: http://127.0.0.1:PORT or http://localhost:PORT."""
        origin = self.headers.get("Origin")
        if origin is None:
            return True
        port = self.server.server_address[1]
        return origin in (f"http://{LOOPBACK}:{port}", f"http://localhost:{port}")

    def do_GET(self) -> None:
        if not self._host_allowed():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "requests must be addressed to 127.0.0.1"})
        url = urlsplit(self.path)
        if url.path in STATIC_FILES:
            name, content_type = STATIC_FILES[url.path]
            return self._send(HTTPStatus.OK, _static(name), f"{content_type}; charset=utf-8")
        if url.path == "/api/items":
            items, notes = self.server.store.items()
            return self._json(
                HTTPStatus.OK,
                {
                    "items": items,
                    "notes": notes,
                    "caption_ext": self.server.store.caption_ext,
                    "roots": [str(r) for r in self.server.store.roots],
                    "reminder": self.server.reminder,
                },
            )
        if url.path == "/api/image":
            return self._image(parse_qs(url.query).get("id", [""])[0])
        self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {url.path}"})

    def _image(self, image_id: str) -> None:
        try:
            path = self.server.store.image_path(image_id)
        except RefusedPath as refused:
            return self._json(refused.status, {"error": str(refused)})
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, path.read_bytes(), content_type)

    def do_POST(self) -> None:
        if not self._host_allowed():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "requests must be addressed to 127.0.0.1"})
        if urlsplit(self.path).path != "/api/save":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "POST goes to /api/save"})
        if not self._origin_allowed():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "saves are accepted from the review page only"})
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send the changes as application/json"})
        declared = (self.headers.get("Content-Length") or "").strip()
        if not declared.isdigit():  # isdigit: no sign, no blank, no "1e3"; int() would raise or accept those
            self.close_connection = True  # the body's end is unknown: the connection cannot be reused
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "Content-Length must be a number of bytes"})
        length = int(declared)
        if not 0 < length <= MAX_BODY:
            self.close_connection = True
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "no body, or too large"})
        try:
            changes = json.loads(self.rfile.read(length))["changes"]
            changes = [(str(c["id"]), str(c["text"]), str(c["version"])) for c in changes]
        except (ValueError, KeyError, TypeError):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": 'expected {"changes": [{"id", "text", "version"}]}'})
        results = []
        for image_id, text, version in changes:
            try:
                results.append(vars(self.server.store.save(image_id, text, version)))
            except RefusedPath as refused:
                return self._json(refused.status, {"error": str(refused), "results": results})
        conflict = any(result["status"] == "conflict" for result in results)
        self._json(HTTPStatus.CONFLICT if conflict else HTTPStatus.OK, {"results": results})


class ReviewServer(ThreadingHTTPServer):
    """The review page's HTTP server over one :class:`CaptionStore`, on 127.0.0.1 only."""

    daemon_threads = True

    def __init__(
        self, store: CaptionStore, port: int = 0, reminder: str | None = None, read_timeout: float = READ_TIMEOUT
    ) -> None:
        self.store = store
        self.reminder = reminder
        self.read_timeout = read_timeout
        super().__init__((LOOPBACK, port), ReviewHandler)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}/"


def start_review_server(
    directory: str | Path, caption_ext: str = ".txt", port: int = 0, read_timeout: float = READ_TIMEOUT
) -> ReviewServer:
    """Builds the server for DIR and starts serving in a background thread (for tests and notebooks)."""
    roots = dataset_roots(directory)
    server = ReviewServer(CaptionStore(roots.roots, caption_ext), port, roots.reminder(), read_timeout)
    threading.Thread(target=server.serve_forever, name="lorafit-review", daemon=True).start()
    return server


def review(dir: str, *, caption_ext: str = ".txt", port: int = 0, open_browser: bool = False) -> None:
    """Serve a local page to review and fix the captions of an image folder (Ctrl+C stops it).

    The page shows every image with its caption in an editable box, tag chips with counts, a
    search box, and bulk operations (add/remove/replace a tag, prepend the trigger word) on all or
    the filtered images. Saving writes the caption atomically and keeps the previous text as
    <caption>.bak; a caption changed on disk since the page loaded it is reported, not overwritten.
    Keys: j/k or arrows move, Enter edits, Esc leaves the box, Ctrl+S saves.

    Args:
        dir: Image folder (kohya layout: '10_ohwx dog/' folders) or a `lorafit prepare` output
            folder, which stands for its source folders (re-run prepare afterwards).
        caption_ext: Extension of the caption sidecar files (.txt or .caption).
        port: Port on 127.0.0.1 to listen on; 0 picks a free one. Only loopback is ever bound.
        open_browser: Also open the page in the default web browser.
    """
    roots = dataset_roots(directory=dir)
    try:
        server = ReviewServer(CaptionStore(roots.roots, caption_ext), port, roots.reminder())
    except OSError as error:
        raise LorafitError(
            f"cannot listen on {LOOPBACK}:{port} ({error.strerror}); choose another --port or 0 for a free one"
        ) from None
    print(f"reviewing captions in {', '.join(str(r) for r in roots.roots)}")
    print(f"open {server.url}  (Ctrl+C stops the server)", flush=True)
    if open_browser:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

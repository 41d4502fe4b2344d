"""`lorafit review`'s server: loopback only, no path traversal, atomic saves with .bak and 409 on conflict."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from cli_runs import REPO, lorafit_command, lorafit_env
from PIL import Image
from review_fixtures import SECRET, make_tree, request, running_server


@pytest.fixture()
def tree(tmp_path) -> Path:
    return make_tree(tmp_path)


def _non_loopback_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the outgoing interface
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_the_cli_serves_on_a_free_loopback_port_and_prints_the_url(tree):
    process = subprocess.Popen(
        lorafit_command("review", str(tree)),
        cwd=REPO,
        env=lorafit_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "open http" in line:
                break
        match = re.search(r"open (http://127\.0\.0\.1:(\d+)/)", "".join(lines))
        assert match, "".join(lines)
        url, port = match.group(1), int(match.group(2))
        assert port != 0
        with urllib.request.urlopen(url, timeout=30) as page:
            html = page.read().decode()
        assert "lorafit review" in html and "/app.js" in html
        assert "http://" not in html and "https://" not in html  # no CDN: every asset from the package
        # Nothing listens on the machine's other addresses.
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=5).close()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_server_binds_only_the_loopback_address(tree):
    with running_server(tree) as server:
        assert server.server_address[0] == "127.0.0.1"
        # A page on another site reaching us through DNS rebinding carries its own Host name.
        port = server.server_address[1]
        status, _ = request(server, "GET", "/api/items", headers={"Host": f"evil.example:{port}"})
        assert status == 403


TRAVERSALS = [
    "0/../outside/secret.png",
    "0/%2e%2e/outside/secret.png",  # percent-encoded ..
    "0/%2E%2E%2Foutside%2Fsecret.png",  # encoded slashes too
    "0/10_ohwx%20dog/../../outside/secret.png",
    "0//etc/passwd",  # absolute path after the root number
    "/etc/passwd",
    "0/linked/secret.png",  # a folder symlink leading out of the root
    "0/escape.png",  # a file symlink leading out of the root
    "1/a.png",  # no such root
    "0/10_ohwx dog/a.txt",  # not an image
    "0/.hidden.png",
]


@pytest.mark.parametrize("image_id", TRAVERSALS)
def test_every_file_parameter_refuses_paths_outside_the_dataset(tree, image_id):
    outside = tree.parent / "outside"
    with running_server(tree) as server:
        status, body = request(server, "GET", f"/api/image?id={image_id.replace(' ', '%20')}")
        assert status in (400, 403, 404), (status, body)
        assert b"PNG" not in (body if isinstance(body, bytes) else b"")
        status, body = request(
            server, "POST", "/api/save", {"changes": [{"id": image_id, "text": "pwned", "version": "absent"}]}
        )
        assert status in (400, 403, 404), (status, body)
    assert (outside / "secret.txt").read_text() == SECRET + "\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png", "secret.txt"]
    assert not list(tree.parent.rglob("*pwned*")) and "pwned" not in "".join(
        p.read_text() for p in tree.parent.rglob("*.txt") if p.is_file()
    )


def test_listing_leaves_out_images_behind_symlinks_out_of_the_root(tree):
    with running_server(tree) as server:
        status, body = request(server, "GET", "/api/items")
    assert status == 200
    assert [item["id"] for item in body["items"]] == [
        "0/10_ohwx dog/a.png",
        "0/10_ohwx dog/nested/b.png",
        "0/1_dog/c.png",
    ]
    assert "2 images reached through symlinks" in body["notes"][0]
    assert SECRET not in str(body)


def test_saving_is_atomic_keeps_a_bak_and_refuses_stale_versions_with_409(tree):
    a_txt = tree / "10_ohwx dog" / "a.txt"
    with running_server(tree) as server:
        items = {item["id"]: item for item in request(server, "GET", "/api/items")[1]["items"]}
        a, c = items["0/10_ohwx dog/a.png"], items["0/1_dog/c.png"]
        assert a["text"] == "ohwx dog, solo, watermark" and c["version"] == "absent"

        status, body = request(
            server,
            "POST",
            "/api/save",
            {
                "changes": [
                    {"id": a["id"], "text": "ohwx dog, solo, smiling", "version": a["version"]},
                    {"id": c["id"], "text": "dog, red ball", "version": "absent"},
                ]
            },
        )
        assert status == 200 and [r["status"] for r in body["results"]] == ["saved", "saved"]
        assert a_txt.read_text() == "ohwx dog, solo, smiling\n"
        assert Path(f"{a_txt}.bak").read_text() == "ohwx dog, solo, watermark\n"
        assert (tree / "1_dog" / "c.txt").read_text() == "dog, red ball\n"
        assert not (tree / "1_dog" / "c.txt.bak").exists()  # there was no previous text
        assert not list(tree.rglob(".partial-*"))  # the atomic write's temporary file is gone

        # Another tab (or an editor) saves a.txt; this page's version is now stale.
        a_txt.write_text("edited elsewhere\n")
        status, body = request(
            server,
            "POST",
            "/api/save",
            {"changes": [{"id": a["id"], "text": "my stale edit", "version": body["results"][0]["version"]}]},
        )
        assert status == 409
        assert body["results"][0]["status"] == "conflict" and body["results"][0]["text"] == "edited elsewhere"
        assert a_txt.read_text() == "edited elsewhere\n"  # not overwritten silently

        # Saving on top of the version the conflict reported is the user's explicit choice.
        status, body = request(
            server,
            "POST",
            "/api/save",
            {"changes": [{"id": a["id"], "text": "my edit wins", "version": body["results"][0]["version"]}]},
        )
        assert status == 200 and a_txt.read_text() == "my edit wins\n"
        assert Path(f"{a_txt}.bak").read_text() == "edited elsewhere\n"


def test_saves_must_be_json(tree):
    with running_server(tree) as server:
        status, _ = request(server, "POST", "/api/save", headers={"Content-Type": "text/plain"}, body={"changes": []})
        assert status == 415
        status, _ = request(server, "POST", "/api/save", {"not": "changes"})
        assert status == 400


def _raw(server, data: bytes, timeout: float = 30) -> bytes:
    """Send ``data`` as is on a fresh connection and read the whole answer."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=timeout) as connection:
        connection.sendall(data)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("length", [b"abc", b"-5", b"1e3", b" ", b"12abc"])
def test_a_content_length_that_is_not_a_number_is_a_400(tree, length):
    port_header = b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
    with running_server(tree) as server:
        answer = _raw(server, b"POST /api/save HTTP/1.1\r\n" + port_header + b"Content-Length: " + length + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"Content-Length must be a number of bytes" in answer
        assert request(server, "GET", "/api/items")[0] == 200  # the server still serves


def test_saves_from_another_origin_are_refused(tree):
    a_txt = tree / "10_ohwx dog" / "a.txt"
    with running_server(tree) as server:
        port = server.server_address[1]
        items = {item["id"]: item for item in request(server, "GET", "/api/items")[1]["items"]}
        change = {
            "changes": [
                {"id": "0/10_ohwx dog/a.png", "text": "pwned", "version": items["0/10_ohwx dog/a.png"]["version"]}
            ]
        }
        for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}"):
            status, body = request(server, "POST", "/api/save", change, headers={"Origin": origin})
            assert status == 403 and "review page only" in body["error"], origin
        assert "pwned" not in a_txt.read_text()
        status, _ = request(server, "POST", "/api/save", change, headers={"Origin": f"http://localhost:{port}"})
        assert status == 200 and a_txt.read_text() == "pwned\n"


def test_stalled_requests_time_out_instead_of_holding_a_thread_each(tree):
    with running_server(tree, read_timeout=0.5) as server:
        before = threading.active_count()
        stalled = []
        for _ in range(30):
            connection = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30)
            connection.sendall(
                b"POST /api/save HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"chan'  # and then nothing more
            )
            stalled.append(connection)
        deadline = time.monotonic() + 20
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert threading.active_count() <= before, "stalled connections still hold their threads"
        for connection in stalled:
            assert connection.recv(100) == b""  # closed by the server
            connection.close()
        assert request(server, "GET", "/api/items")[0] == 200


def test_caption_files_linked_out_of_the_dataset_are_neither_read_nor_written(tree):
    outside = tree.parent / "outside"
    linked = tree / "10_ohwx dog" / "d.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(linked)
    linked.with_suffix(".txt").symlink_to(outside / "secret.txt")
    with running_server(tree) as server:
        status, body = request(server, "GET", "/api/items")
        assert status == 200 and SECRET not in str(body)
        assert "0/10_ohwx dog/d.png" not in [item["id"] for item in body["items"]]
        assert "or whose caption file is such a symlink" in body["notes"][0]
        change = {"changes": [{"id": "0/10_ohwx dog/d.png", "text": "pwned", "version": "absent"}]}
        status, body = request(server, "POST", "/api/save", change)
        assert status == 403 and "symlink leading outside" in body["error"]
    assert (outside / "secret.txt").read_text() == SECRET + "\n"
    assert linked.with_suffix(".txt").is_symlink() and not (tree / "10_ohwx dog" / "d.txt.bak").exists()


def test_captions_in_other_encodings_show_their_text_and_the_bak_keeps_it(tree):
    a_txt = tree / "10_ohwx dog" / "a.txt"
    a_txt.write_bytes("ohwx dog, café".encode("latin-1"))
    with running_server(tree) as server:
        (item,) = [i for i in request(server, "GET", "/api/items")[1]["items"] if i["id"] == "0/10_ohwx dog/a.png"]
        assert item["text"] == "ohwx dog, café"
        change = {"changes": [{"id": item["id"], "text": "ohwx dog, café, smiling", "version": item["version"]}]}
        assert request(server, "POST", "/api/save", change)[0] == 200
    assert a_txt.read_text(encoding="utf-8") == "ohwx dog, café, smiling\n"
    assert Path(f"{a_txt}.bak").read_text(encoding="utf-8") == "ohwx dog, café"

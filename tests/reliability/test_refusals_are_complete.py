"""Every refusal is a complete HTTP response, even while the client is still sending its body: a server that
answers early and closes with unread bytes in its socket makes the kernel reset the connection, and the client
may then lose the answer ("Server disconnected without sending a response"). Raw sockets, so nothing between
the test and the server reads or retries for it."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.integration

BOUNDARY = b"imageserve-test-boundary"


def post_whole_body_then_read(url: str, path: str, headers: bytes, body: bytes) -> bytes:
    """Send the request line, headers and the whole body (64 KB at a time, as an upload goes), and only then
    read the answer to its end. A server that closed early fails the sending or loses the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=120) as conn:
        conn.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        for start in range(0, len(body), 65536):
            conn.sendall(body[start:start + 65536])
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
            head, _, rest = answer.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(rest) >= length:
                break
    return answer


def multipart(size: int) -> bytes:
    return (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nmake it blue\r\n--'
            + BOUNDARY + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + b"\x00" * size + b"\r\n--" + BOUNDARY + b"--\r\n")


@pytest.mark.parametrize("size_mb", [3, 8])
def test_a_body_over_the_limit_by_content_length_gets_its_whole_413(reliable, size_mb):
    body = multipart(size_mb * 1024 * 1024)  # the service's limit is 2 MB
    answer = post_whole_body_then_read(
        reliable.url, "/v1/images/edits",
        b"Content-Type: multipart/form-data; boundary=" + BOUNDARY + b"\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n", body)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert json.loads(rest)["error"]["code"] == "request_too_large"


def test_a_chunked_body_over_the_limit_gets_its_whole_413(reliable):
    data = multipart(3 * 1024 * 1024)
    chunked = b"".join(b"%x\r\n" % len(data[i:i + 65536]) + data[i:i + 65536] + b"\r\n"
                       for i in range(0, len(data), 65536)) + b"0\r\n\r\n"
    answer = post_whole_body_then_read(
        reliable.url, "/v1/images/edits",
        b"Content-Type: multipart/form-data; boundary=" + BOUNDARY + b"\r\nTransfer-Encoding: chunked\r\n", chunked)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]

"""Slow and idle clients: hundreds of idle connections and slowloris clients (a request head one
byte at a time) do not keep a normal request from being served, and the server closes a connection that
has not sent a complete request head within REQUEST_HEAD_TIMEOUT_S (README "Connections")."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from fake_engine import FakeEngine, chat_body, serving

from macprovider.serve import runtime


def _closed_by_server(sock: socket.socket, trickle: bytes = b"", within: float = 10.0) -> bool:
    """Send `trickle` one byte at a time (0.2 s apart) until the server closes the connection; True when it
    did within `within` seconds."""
    deadline = time.monotonic() + within
    sock.settimeout(0.2)
    sent = 0
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
            if not data:
                return True
        except TimeoutError:
            pass
        except ConnectionError:
            return True
        if sent < len(trickle):
            try:
                sock.sendall(trickle[sent : sent + 1])
            except (BrokenPipeError, ConnectionError):
                return True
            sent += 1
    return False


@pytest.fixture
def short_head_timeout(monkeypatch):
    monkeypatch.setattr(runtime, "REQUEST_HEAD_TIMEOUT_S", 1.0)


def test_idle_and_slowloris_connections_do_not_block_a_normal_request(short_head_timeout):
    runtime.raise_open_file_limit()
    engine = FakeEngine()
    with serving(engine) as server:
        idle = [socket.create_connection(("127.0.0.1", server.runtime.port)) for _ in range(500)]
        stop = threading.Event()

        def slowloris(sock: socket.socket) -> None:
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
            for byte in head:
                if stop.wait(0.05):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

        slow = [socket.create_connection(("127.0.0.1", server.runtime.port)) for _ in range(5)]
        threads = [threading.Thread(target=slowloris, args=(s,), daemon=True) for s in slow]
        for thread in threads:
            thread.start()
        try:
            with server.http() as http:  # timeout 10 s
                started = time.monotonic()
                response = http.post("/v1/chat/completions", json=chat_body(engine))
                elapsed = time.monotonic() - started
            assert response.status_code == 200, response.text
            assert elapsed < 10
        finally:
            stop.set()
            for sock in idle + slow:
                sock.close()


def test_a_connection_without_a_complete_head_is_closed(short_head_timeout):
    with serving(FakeEngine()) as server:
        with socket.create_connection(("127.0.0.1", server.runtime.port)) as silent:
            assert _closed_by_server(silent)  # never sends a byte
        with socket.create_connection(("127.0.0.1", server.runtime.port)) as slow:
            assert _closed_by_server(slow, trickle=b"GET /v1/health HTTP/1.1\r\nX-Slow: " + b"a" * 100)


def test_a_keep_alive_connection_is_closed_when_idle_after_a_response(short_head_timeout, monkeypatch):
    with serving(FakeEngine()) as server:
        with socket.create_connection(("127.0.0.1", server.runtime.port)) as sock:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            # The next request's head trickles in slower than REQUEST_HEAD_TIMEOUT_S allows (each byte also
            # resets uvicorn's own keep-alive timer, so only the head deadline can end this).
            assert _closed_by_server(sock, trickle=b"GET /v1/health HTTP/1.1\r\nX-Slow: " + b"a" * 100)


def test_request_heads_up_to_the_limit_are_served_and_bigger_ones_refused():
    with serving(FakeEngine()) as server:
        fits = server.raw(
            b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 40_000 + b"\r\nConnection: close\r\n\r\n"
        )
        assert fits.startswith(b"HTTP/1.1 200")  # above h11's 16 KiB default
        # A head still incomplete past MAX_REQUEST_HEAD_BYTES is refused without waiting for the rest.
        with socket.create_connection(("127.0.0.1", server.runtime.port), timeout=10) as sock:
            sock.sendall(
                b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
                + b"a" * (runtime.MAX_REQUEST_HEAD_BYTES + 1024)
            )
            assert sock.recv(65536).startswith(b"HTTP/1.1 400")

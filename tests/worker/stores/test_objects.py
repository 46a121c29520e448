"""S3 faults that the real server cannot be asked to make: a hung call and 500 answers,
from servers these tests start on 127.0.0.1."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from schemas.settings import S3Settings, Settings
from worker.errors import TransientFault
from worker.stores import objects


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    for connection in accepted:
        connection.close()
    listener.close()


@pytest.fixture
def failing_server() -> Iterator[int]:
    """Answers every request with 500."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(500)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests are signed, so that what fails is the server, not a missing key."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")


def client_for(port: int) -> objects.S3Client:
    settings = S3Settings(
        endpoint_url=f"http://127.0.0.1:{port}", connect_timeout_s=1.0, read_timeout_s=1.0
    )
    return objects.make_client(settings)


def test_a_hung_s3_call_ends_at_its_timeout_as_a_transient_fault(silent_server: int) -> None:
    client = client_for(silent_server)
    started = time.monotonic()

    with pytest.raises(TransientFault) as caught:
        objects.get_object(client, "s3://catalog-images/a.jpg", max_bytes=1000)

    assert "timeout" in str(caught.value).lower()
    assert time.monotonic() - started < 30


def test_an_s3_server_answering_errors_is_a_transient_fault(failing_server: int) -> None:
    client = client_for(failing_server)

    with pytest.raises(TransientFault) as caught:
        objects.get_object(client, "s3://catalog-images/a.jpg", max_bytes=1000)

    assert "500" in str(caught.value)


def test_secrets_never_show_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICH_BROKER_URL", "amqp://svc:s3cret-broker@10.1.2.3:5672//")
    monkeypatch.setenv("ENRICH_DATABASE_URL", "postgresql://svc:s3cret-db@db/enrichment")

    shown = repr(Settings()) + str(Settings().model_dump())

    assert "s3cret" not in shown

"""An https server on 127.0.0.1 with a certificate of a throwaway CA, for tests that fetch
photos. It serves nothing to any other address."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trustme


@dataclass
class HttpsServer:
    base: str
    ca_file: Path
    requests: list[str] = field(default_factory=list)


@contextmanager
def https_server(folder: Path, body_for: Callable[[str], bytes]) -> Iterator[HttpsServer]:
    """Serves `body_for(path)` for every path, and `/redirect?to=URL` as a 302 to URL.

    The CA's certificate is written to `folder / "ca.pem"` for the client to trust.
    """
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(folder / "ca.pem"))
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", self.path.split("to=", 1)[1])
                self.end_headers()
                return
            body = body_for(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield HttpsServer(
            f"https://127.0.0.1:{httpd.server_address[1]}", folder / "ca.pem", requests
        )
    finally:
        httpd.shutdown()

"""Fetching product photos: s3:// from allowed buckets, https:// from allow-listed hosts."""

from __future__ import annotations

import ipaddress
import socket
import time
from urllib.parse import SplitResult, urljoin, urlsplit

import urllib3

from schemas.settings import ImageSettings, S3Settings
from worker.errors import TransientFault, UnreadableImage
from worker.stores import objects

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ImageFetcher:
    """Reads s3:// URLs from allowed buckets and https:// URLs from allow-listed hosts."""

    def __init__(self, s3_client: objects.S3Client, s3: S3Settings, images: ImageSettings):
        self.s3_client = s3_client
        self.s3 = s3
        self.images = images

    def fetch(self, url: str) -> bytes:
        if url.startswith("s3://"):
            bucket, _ = objects.split_s3_url(url)
            if self.s3.image_buckets and bucket not in self.s3.image_buckets:
                raise UnreadableImage(url, f"bucket {bucket!r} is not in ENRICH_S3__IMAGE_BUCKETS")
            return objects.get_object(self.s3_client, url, max_bytes=self.images.max_bytes)
        return self._fetch_https(url)

    def _fetch_https(self, url: str, redirects_left: int | None = None) -> bytes:
        """GET an allow-listed https URL from an address checked before connecting.

        The connection goes to the address that was checked (no second DNS answer can
        redirect it), with the host name kept for TLS. Redirects are followed by hand, each
        target checked like the first; the whole download has a size and a time limit.
        """
        limits = self.images
        redirects_left = limits.max_redirects if redirects_left is None else redirects_left
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme != "https":
            raise UnreadableImage(url, "only https URLs are fetched")
        if host not in limits.https_hosts:
            raise UnreadableImage(url, f"host {host!r} is not in ENRICH_IMAGES__HTTPS_HOSTS")

        address = resolve_public_address(url, host, parts.port or 443, limits.allowed_networks)
        response = self._get(url, address, parts)
        with response:
            if response.status in _REDIRECTS:
                if redirects_left == 0:
                    raise UnreadableImage(url, f"more than {limits.max_redirects} redirects")
                target = urljoin(url, response.headers.get("Location", ""))
                return self._fetch_https(target, redirects_left - 1)
            if response.status >= 500:
                raise TransientFault(f"fetching {url} answered {response.status}")
            if response.status != 200:
                raise UnreadableImage(url, f"the server answered HTTP {response.status}")
            return _read_limited(url, response, limits.max_bytes, limits.timeout_s)

    def _get(self, url: str, address: str, parts: SplitResult) -> urllib3.BaseHTTPResponse:
        host = parts.hostname or ""
        pool = urllib3.HTTPSConnectionPool(
            address,
            parts.port or 443,
            server_hostname=host,
            assert_hostname=host,
            ca_certs=str(self.images.ca_bundle) if self.images.ca_bundle else None,
            timeout=urllib3.Timeout(connect=5.0, read=self.images.timeout_s),
            retries=False,
        )
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        try:
            return pool.urlopen(
                "GET", path, headers={"Host": parts.netloc}, redirect=False, preload_content=False
            )
        except urllib3.exceptions.SSLError as exc:
            raise UnreadableImage(url, f"TLS failed: {exc}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise TransientFault(f"fetching {url} failed: {exc}") from exc


_REDIRECTS = {301, 302, 303, 307, 308}
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


def resolve_public_address(url: str, host: str, port: int, allowed_networks: list[str]) -> str:
    """The host's first address, once every address it resolves to has been checked.

    Loopback, private, link-local, reserved and multicast addresses are refused unless an
    allowed network holds them; cloud metadata addresses are refused always.
    """
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransientFault(f"resolving {host} failed: {exc}") from exc

    allowed = [ipaddress.ip_network(block) for block in allowed_networks]
    addresses = [ipaddress.ip_address(answer[4][0]) for answer in answers]
    for address in addresses:
        reason = _refusal(address, allowed)
        if reason is not None:
            raise UnreadableImage(url, f"{host} resolves to {address}, {reason}; refused")
    return str(addresses[0])


def _refusal(address: IPAddress, allowed: list[IPNetwork]) -> str | None:
    if address in _METADATA:
        return "a cloud metadata address"
    if any(address in network for network in allowed):
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private or address.is_reserved or address.is_multicast:
        return "not a public address"
    if address.is_unspecified:
        return "an unspecified address"
    return None


def _read_limited(
    url: str, response: urllib3.BaseHTTPResponse, max_bytes: int, timeout_s: float
) -> bytes:
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    size = 0
    for chunk in response.stream(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise UnreadableImage(url, f"larger than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise UnreadableImage(url, f"the download took longer than {timeout_s} s")
        chunks.append(chunk)
    return b"".join(chunks)

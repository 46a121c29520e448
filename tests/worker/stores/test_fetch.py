"""Hostile URLs: fetched only from allow-listed hosts on checked addresses. The only server
here is one these tests start on 127.0.0.1; no traffic goes anywhere else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from schemas.settings import ImageSettings, S3Settings
from tests.tls import HttpsServer as Server
from tests.tls import https_server
from worker.errors import UnreadableImage
from worker.stores.fetch import ImageFetcher

PHOTO = b"\x89PNG pretend image bytes"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    def body_for(path: str) -> bytes:
        return PHOTO * (1000 if path == "/big.png" else 1)

    with https_server(tmp_path_factory.mktemp("tls"), body_for) as started:
        yield started


def fetcher(server: Server, **changes: object) -> ImageFetcher:
    images = ImageSettings(
        https_hosts=["127.0.0.1"], allowed_networks=["127.0.0.1/32"], ca_bundle=server.ca_file
    ).model_copy(update=changes)
    return ImageFetcher(s3_client=None, s3=S3Settings(), images=images)  # type: ignore[arg-type]


def test_fetches_from_an_allow_listed_host_on_an_allowed_network(server: Server) -> None:
    data = fetcher(server).fetch(f"{server.base}/photo.png")

    assert data == PHOTO


def test_refuses_a_loopback_address_before_connecting(server: Server) -> None:
    seen = len(server.requests)

    with pytest.raises(UnreadableImage) as caught:
        fetcher(server, allowed_networks=[]).fetch(f"{server.base}/photo.png")

    assert "loopback" in caught.value.reason
    assert len(server.requests) == seen


def test_refuses_a_host_that_is_not_allow_listed(server: Server) -> None:
    with pytest.raises(UnreadableImage) as caught:
        fetcher(server, https_hosts=["images.shop.example"]).fetch(f"{server.base}/a.png")

    assert "HTTPS_HOSTS" in caught.value.reason


def test_refuses_cloud_metadata_even_where_every_network_is_allowed(server: Server) -> None:
    images = fetcher(server, https_hosts=["169.254.169.254"], allowed_networks=["0.0.0.0/0"])

    with pytest.raises(UnreadableImage) as caught:
        images.fetch("https://169.254.169.254/latest/meta-data/")

    assert "metadata" in caught.value.reason


def test_checks_a_redirect_target_like_the_first_url(server: Server) -> None:
    url = f"{server.base}/redirect?to=https://10.0.0.7/internal.png"

    with pytest.raises(UnreadableImage) as caught:
        fetcher(server, https_hosts=["127.0.0.1", "10.0.0.7"]).fetch(url)

    assert "10.0.0.7" in caught.value.reason and "not a public address" in caught.value.reason


def test_follows_a_redirect_to_an_allowed_target(server: Server) -> None:
    url = f"{server.base}/redirect?to={server.base}/photo.png"

    data = fetcher(server).fetch(url)

    assert data == PHOTO


def test_refuses_a_download_over_the_size_limit(server: Server) -> None:
    with pytest.raises(UnreadableImage) as caught:
        fetcher(server, max_bytes=1000).fetch(f"{server.base}/big.png")

    assert "larger than 1000 bytes" in caught.value.reason


def test_refuses_plain_http(server: Server) -> None:
    with pytest.raises(UnreadableImage) as caught:
        fetcher(server).fetch(server.base.replace("https", "http") + "/photo.png")

    assert "only https" in caught.value.reason

"""S3: reading product photos and writing mask PNGs.

A client is made per process, after the fork (boto3 clients are not fork-safe), with
explicit timeouts so that a hung call ends.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import boto3
import numpy as np
import numpy.typing as npt
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError
from PIL import Image

from schemas.settings import S3Settings
from worker.errors import TransientFault, UnreadableImage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client as S3Client
else:
    S3Client = Any

_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "403", "AccessDenied"}


def make_client(settings: S3Settings) -> S3Client:
    config = Config(
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
    )


def split_s3_url(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def mask_key(product_id: str, image_sha256: str, model_version: str, index: int) -> str:
    """A deterministic key, so that writing the same mask twice overwrites, never adds."""
    return f"masks/{product_id}/{image_sha256}/{model_version}/{index}.png"


def encode_mask_png(mask: npt.NDArray[np.bool_]) -> bytes:
    """One mask (H, W) bool as a one-channel PNG of the same size, 0 or 255."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def ensure_bucket(client: S3Client, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)


def put_mask(client: S3Client, bucket: str, key: str, png: bytes) -> str:
    try:
        client.put_object(Bucket=bucket, Key=key, Body=png, ContentType="image/png")
    except (BotoCoreError, ClientError) as exc:
        raise TransientFault(f"writing s3://{bucket}/{key} failed: {exc}") from exc
    return f"s3://{bucket}/{key}"


def get_object(client: S3Client, url: str, *, max_bytes: int) -> bytes:
    """An object's bytes; a missing object is unreadable, an unreachable server transient."""
    bucket, key = split_s3_url(url)
    try:
        head: Any = client.head_object(Bucket=bucket, Key=key)
        if int(head["ContentLength"]) > max_bytes:
            raise UnreadableImage(url, f"object is {head['ContentLength']} bytes, over {max_bytes}")
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            raise UnreadableImage(url, f"S3 answered {code}") from exc
        raise TransientFault(f"reading {url} failed: {exc}") from exc
    except (EndpointConnectionError, BotoCoreError) as exc:
        raise TransientFault(f"reading {url} failed: {exc}") from exc

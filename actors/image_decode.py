"""Turning an image envelope into pixels: where its bytes come from, what may be decoded, and how.

An image arrives inline (``image_b64``) or by ``uri``, which is one of:

- a file: ``file:///abs/path.png`` or ``/abs/path.png``, readable only under one of the configured
  roots (``ImageLimits.roots``). The path is resolved (``..`` and symbolic links followed) before
  the check, so neither can step outside a root; a relative path is refused;
- ``http://`` or ``https://`` (when ``ImageLimits.allow_http``): fetched with a byte cap, a few
  tries for a transient failure (timeout, connection, 5xx, 429) while time is left, and an answer
  (the bytes, or a refusal) within ``fetch_timeout_s`` in all, however slowly the server answers
  (:func:`fetch`).

Decoding accepts PNG, JPEG, WebP and GIF (its first frame) and nothing else, applies the EXIF
orientation, refuses more than ``max_pixels`` pixels before decoding them (a decompression bomb
is a few KB of PNG), and returns RGB (transparency composited on white, so a transparent pixel
has one colour whatever the encoder left under it).

Every refusal is an :class:`InvalidImageError` (dead-letter reason ``invalid_image``) whose
message names what is wrong: the record can never be processed, and the partition goes on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from schemas.errors import PoisonMessageError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
FETCH_TRIES = 3


class InvalidImageError(PoisonMessageError):
    """An image that cannot be read or decoded, or is refused (size, format, place)."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_image", message)


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be. ``roots``: directories under which ``uri`` files may be read (none:
    no file is read). ``max_bytes``: the encoded image, inline or fetched. ``max_pixels``: width
    times height (of the first frame)."""

    roots: Sequence[Path] = field(default_factory=tuple)
    allow_http: bool = True
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    fetch_timeout_s: float = 10.0


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for the model: RGB pixels, and the digest of the encoded bytes (the
    identity of its content: the same bytes are the same image)."""

    image: Image.Image
    sha256: str
    format: str
    encoded_bytes: int


def image_bytes(image_b64: str | None, uri: str | None, limits: ImageLimits) -> bytes:
    """The encoded image an envelope carries: ``image_b64`` decoded, or what ``uri`` names."""
    if image_b64 is not None:
        if len(image_b64) > (limits.max_bytes + 2) // 3 * 4 + 4:  # before decoding it
            raise InvalidImageError(f"image_b64 holds more than {limits.max_bytes} bytes")
        try:
            data = base64.b64decode(image_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidImageError(f"image_b64 is not valid base64: {exc}") from exc
        _check_size(len(data), limits, "image_b64")
        return data
    if uri is None:
        raise InvalidImageError("the envelope has neither image_b64 nor uri")
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        if not limits.allow_http:
            raise InvalidImageError(f"uri {uri!r}: http(s) images are not allowed here (images.allow_http)")
        return fetch(uri, limits)
    return read_file(file_path(uri, limits.roots), limits)


def file_path(uri: str, roots: Sequence[Path]) -> Path:
    """The file ``uri`` names (``file:///abs`` or ``/abs``), resolved, when it lies under one of
    ``roots``; :class:`InvalidImageError` otherwise."""
    parts = urlsplit(uri)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidImageError(f"uri {uri!r}: a file uri must name a local file (file:///path)")
        raw = unquote(parts.path)
    elif parts.scheme == "" and uri.startswith("/"):
        raw = uri
    else:
        raise InvalidImageError(
            f"uri {uri!r}: only file:///absolute/path, /absolute/path and http(s) uris are read"
        )
    if "\x00" in raw:
        raise InvalidImageError(f"uri {uri!r}: a path cannot hold NUL")
    if not roots:
        raise InvalidImageError(
            f"uri {uri!r}: no directory is open to image uris (images.uri_roots is empty)"
        )
    path = Path(raw).resolve()
    for root in roots:
        if path.is_relative_to(Path(root).resolve()):
            return path
    raise InvalidImageError(
        f"uri {uri!r}: {path} is outside the directories open to image uris ({', '.join(map(str, roots))})"
    )


def read_file(path: Path, limits: ImageLimits) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limits.max_bytes + 1)
    except FileNotFoundError as exc:
        raise InvalidImageError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise InvalidImageError(f"{path}: a directory, not an image") from exc
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    _check_size(len(data), limits, str(path))
    return data


MIN_TRY_S = 0.1
"""Another try starts only with at least this much of ``fetch_timeout_s`` left."""
FETCH_GRACE_S = 0.5
"""How long past ``fetch_timeout_s`` :func:`fetch` waits for a try to notice its deadline."""


def fetch(url: str, limits: ImageLimits) -> bytes:
    """``url``'s body, at most ``limits.max_bytes``; tries again after a transient failure
    (:data:`FETCH_TRIES` in all) while time is left; :class:`InvalidImageError` otherwise.

    Returns or raises within ``limits.fetch_timeout_s`` (plus :data:`FETCH_GRACE_S`) of the call,
    whatever the server does: the fetch runs in a daemon thread that is left behind at the
    deadline. That thread ends by itself at its next read (each waits at most what was left when
    its try began, and a body still arriving past the deadline is refused at its next chunk); only
    a server that trickles its headers can hold it longer, never the caller."""
    outcome: list[bytes | BaseException] = []
    deadline = time.monotonic() + limits.fetch_timeout_s

    def run() -> None:
        try:
            outcome.append(_fetch(url, limits, deadline))
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)

    worker = threading.Thread(target=run, name="image-fetch", daemon=True)
    worker.start()
    worker.join(limits.fetch_timeout_s + FETCH_GRACE_S)
    if not outcome:
        raise InvalidImageError(
            f"uri {url!r}: not fetched within images.fetch_timeout_s ({limits.fetch_timeout_s:g} s; the "
            "server has not finished answering)"
        )
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _fetch(url: str, limits: ImageLimits, deadline: float) -> bytes:
    import httpx

    last, tries = "", 0
    for attempt in range(FETCH_TRIES):
        if attempt:
            pause = 0.5 * 2 ** (attempt - 1)
            if deadline - time.monotonic() - pause < MIN_TRY_S:
                break
            time.sleep(pause)
        tries = attempt + 1
        try:
            left = max(MIN_TRY_S, deadline - time.monotonic())
            with httpx.stream("GET", url, timeout=left, follow_redirects=True) as response:
                if response.status_code >= 500 or response.status_code == 429:
                    last = f"HTTP {response.status_code}"
                    continue
                if response.status_code != 200:
                    raise InvalidImageError(f"uri {url!r}: HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit():
                    _check_size(int(declared), limits, f"uri {url!r}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    _check_size(len(body), limits, f"uri {url!r}")
                    if time.monotonic() > deadline:
                        raise InvalidImageError(
                            f"uri {url!r}: the body took longer than images.fetch_timeout_s "
                            f"({limits.fetch_timeout_s:g} s; {len(body):,} bytes read)"
                        )
                return bytes(body)
        except httpx.TransportError as exc:  # timeouts, refused or reset connections
            last = f"{type(exc).__name__}: {exc}"
        except httpx.InvalidURL as exc:
            raise InvalidImageError(f"uri {url!r}: {exc}") from exc
    raise InvalidImageError(
        f"uri {url!r}: not fetched after {tries} {'try' if tries == 1 else 'tries'} within "
        f"images.fetch_timeout_s ({limits.fetch_timeout_s:g} s; {last})"
    )


def decode(data: bytes, limits: ImageLimits) -> DecodedImage:
    """``data`` decoded as :func:`decode`'s module doc says."""
    _check_size(len(data), limits, "the image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = opened.size
            if width * height > limits.max_pixels:
                pixels = f"{width}x{height} is {width * height:,} pixels"
                raise InvalidImageError(f"{pixels}, more than the {limits.max_pixels:,} allowed")
            fmt = str(opened.format)
            opened.seek(0)  # an animation's first frame
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except InvalidImageError:
        raise
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"not a {', '.join(FORMATS)} image ({len(data)} bytes)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"refused as a decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise InvalidImageError(f"cannot decode the image: {exc}") from exc
    return DecodedImage(_rgb(image), hashlib.sha256(data).hexdigest(), fmt, len(data))


THUMBNAIL_MAX_BYTES = 32 * 1024
"""The most a thumbnail's JPEG may weigh: returned in every search hit, and stored in a record's
metadata, which a backend may cap (Milvus: 64 KiB of JSON, and base64 adds a third)."""


def thumbnail(
    image: Image.Image, size: int = 128, quality: int = 80, max_bytes: int = THUMBNAIL_MAX_BYTES
) -> bytes:
    """A JPEG of ``image`` fitting ``size`` x ``size`` (never enlarged), small enough to return in
    every search hit: at most ``max_bytes``, by a lower quality (down to 35 in steps of 15) and
    then a smaller size (a noisy photo at 512 px weighs over 100 KB at quality 80). At 16 px it is
    returned whatever it weighs (well under a kilobyte)."""
    qualities = [*range(quality, 34, -15)] or [quality]
    while True:
        copy = image.copy()
        copy.thumbnail((size, size))
        for q in qualities:
            out = io.BytesIO()
            copy.save(out, format="JPEG", quality=q)
            if out.tell() <= max_bytes:
                return out.getvalue()
        if size <= 16:
            return out.getvalue()
        size = max(16, size * 3 // 4)


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _check_size(n: int, limits: ImageLimits, what: str) -> None:
    if n > limits.max_bytes:
        raise InvalidImageError(f"{what} is more than {limits.max_bytes:,} bytes")

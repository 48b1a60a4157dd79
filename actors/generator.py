"""Chat generation for RAG answers: a local transformers causal LM, or any OpenAI-compatible endpoint.

Both backends implement :class:`Generator`; :func:`make_generator` picks one from
``settings.serve.llm``. They are plain classes with a cheap ``__init__`` and a ``warm_up()`` that
loads (construction never does slow work, so a failure to load is reported by ``warm_up()``,
when the caller asked for it); the Serve deployment wraps them. torch, transformers and openai are
imported when a backend is built or warmed up, never by this module.

GGUF models (the packaged SmolLM2 is one) are dequantized by transformers at every load, which
takes tens of seconds on a CPU. :class:`LocalGenerator` does it once, saves the dense model and its
tokenizer under ``cache_dir/models/`` and loads that copy from then on (about a second).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path
from typing import Any, Protocol

from actors.models import resolve_model
from schemas.errors import ConfigError, RetryableError
from schemas.settings import GeneratorConfig

# transformers' models and tokenizers, typed Any: its stubs are too loose (tensors vs lists) for
# mypy to follow calls like apply_chat_template.
Model = Any
Tokenizer = Any
logger = logging.getLogger(__name__)

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": str}``."""


@dataclass(frozen=True)
class Generation:
    """One completion. ``text``: the new text only (no prompt, no special tokens).
    ``prompt_tokens``/``completion_tokens``: as the backend counted them (0 when it did not say)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    model: str


class Generator(Protocol):
    """What RAG needs from a chat model. Implementations: :class:`LocalGenerator`,
    :class:`OpenAIChatGenerator`."""

    @property
    def model_name(self) -> str: ...

    def warm_up(self) -> None: ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, messages: list[Message], max_new_tokens: int | None = None) -> Generation: ...


class LocalGenerator:
    """A transformers causal LM with a chat template, on one device.

    - ``__init__`` is cheap; :meth:`warm_up` loads (idempotent); the other methods warm up on
      first use. ConfigError when the model cannot be loaded, has no chat template, or
      ``device="cuda"`` finds no CUDA device.
    - Device: ``"auto"`` is CUDA (fp16 weights) when available, else CPU (fp32). torch's thread
      count is left as the process set it (Ray sets it from the actor's ``num_cpus``).
    - GGUF files are converted once to a dense copy in ``cache_dir/models/<name>-<hash>``, the hash
      covering the GGUF file's path, size and mtime (a changed file converts again). The copy is
      written to a temporary directory and renamed into place, so readers never see half a copy;
      when several processes convert at once, the first rename wins and the others use it.
    - Decoding: greedy when ``temperature == 0`` (deterministic for a given device and dtype),
      else sampling at that temperature.
    - Thread-safe: :meth:`generate` and :meth:`stream` hold one lock for the whole generation,
      so concurrent calls queue up; :meth:`count_tokens` does not wait for it.
    """

    def __init__(self, config: GeneratorConfig, cache_dir: Path) -> None:
        self._config = config
        self._cache_dir = Path(cache_dir)
        self._model: Model | None = None
        self._tokenizer: Tokenizer | None = None
        self._device = "cpu"
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.loaded_from: str | None = None
        """Where the weights came from: the converted copy, the GGUF file, or the model's files.
        None before warm-up."""

    @property
    def model_name(self) -> str:
        """The model id as configured: its identity, whichever copy of its files was loaded."""
        return self._config.model

    @property
    def device(self) -> str:
        """``"cuda"`` or ``"cpu"``: where the model runs (loads it)."""
        self._load()
        return self._device

    def converted_dir(self) -> Path | None:
        """Where the dense copy of a GGUF model lives (whether written yet or not); None for
        models that are not GGUF."""
        resolved = resolve_model(self._config.model)
        if resolved.gguf_file is None:
            return None
        gguf = Path(resolved.location) / resolved.gguf_file
        try:
            stat = gguf.stat()
        except OSError as exc:
            raise ConfigError(
                f"llm.model {self._config.model!r}: GGUF file {gguf} is unreadable: {exc}"
            ) from exc
        digest = blake2b(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=6)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "--", self._config.model).strip("-.") or "model"
        return self._cache_dir / "models" / f"{safe}-{digest.hexdigest()}"

    def warm_up(self) -> None:
        """Loads model and tokenizer onto the device; converts a GGUF model first if needed."""
        self._load()

    def _load(self) -> tuple[Model, Tokenizer]:
        with self._load_lock:
            if self._model is None or self._tokenizer is None:
                self._model, self._tokenizer = self._load_now()
            return self._model, self._tokenizer

    def _load_now(self) -> tuple[Model, Tokenizer]:
        import torch

        device = self._config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("llm.device is 'cuda' but torch sees no CUDA device")
        dtype = torch.float16 if device == "cuda" else torch.float32
        started = time.perf_counter()
        resolved = resolve_model(self._config.model)
        converted = self.converted_dir()
        try:
            if converted is not None and (converted / "config.json").is_file():
                source = str(converted)
                model, tokenizer = _load_dense(source, dtype)
            elif converted is not None and resolved.gguf_file is not None:
                source = str(Path(resolved.location) / resolved.gguf_file)
                model, tokenizer = _convert_gguf(resolved.location, resolved.gguf_file, converted)
            else:
                source = resolved.location
                model, tokenizer = _load_dense(source, dtype)
        except (OSError, ValueError, ImportError) as exc:
            raise ConfigError(f"llm.model {self._config.model!r} cannot be loaded: {exc}") from exc
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"llm.model {self._config.model!r} has no chat template; use a chat model")
        model = model.to(device=device, dtype=dtype).eval()
        self._device, self.loaded_from = device, source
        logger.info(
            "generator ready: %s on %s from %s in %.1f s (%d threads)",
            *(self._config.model, device, source, time.perf_counter() - started, torch.get_num_threads()),
        )
        return model, tokenizer

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` alone (no special tokens), in this model's tokenizer."""
        _, tokenizer = self._load()
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, messages: list[Message]) -> str:
        """The prompt text the model reads for ``messages``: its chat template applied, with the
        generation prompt (the opening of the assistant's turn) added."""
        _, tokenizer = self._load()
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def _prepare(self, messages: list[Message], max_new_tokens: int | None) -> tuple[Any, dict[str, Any]]:
        """Chat-templated input ids on the device, and the ``generate`` keyword arguments."""
        model, tokenizer = self._load()
        limit = self._config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if limit < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {limit}")
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        input_ids = encoded["input_ids"].to(self._device)
        window = getattr(model.config, "max_position_embeddings", None)
        if window is not None and input_ids.shape[1] + limit > window:
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens + {limit} new exceeds {self.model_name}'s {window}"
            )
        kwargs: dict[str, Any] = {
            "attention_mask": encoded["attention_mask"].to(self._device),
            "max_new_tokens": limit,
            "pad_token_id": _pad_token_id(model, tokenizer),
        }
        if self._config.temperature > 0:
            kwargs.update(do_sample=True, temperature=self._config.temperature)
        else:
            # None clears sampling defaults a model's generation_config may carry (they warn otherwise).
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return input_ids, kwargs

    def generate(self, messages: list[Message], max_new_tokens: int | None = None) -> Generation:
        """The model's reply to ``messages`` (chat template applied, generation prompt added), at
        most ``max_new_tokens`` (default: the config's) new tokens. ValueError when the prompt
        plus the new tokens exceed the model's context window."""
        import torch

        model, tokenizer = self._load()
        with self._lock, torch.inference_mode():
            input_ids, kwargs = self._prepare(messages, max_new_tokens)
            output = model.generate(input_ids, **kwargs)
        new = output[0, input_ids.shape[1] :]
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        return Generation(text, int(input_ids.shape[1]), int(new.shape[0]), self.model_name)

    def score(self, messages: list[Message], reply: str) -> tuple[float, int]:
        """How well the model predicts ``reply`` as its answer to ``messages``: the summed negative
        log-likelihood (nats) of ``reply``'s tokens after the chat-templated prompt (generation
        prompt added), and their number. ``exp(nll / tokens)`` is the reply's perplexity.
        ValueError for an empty reply or one that does not fit the context window."""
        import torch

        model, tokenizer = self._load()
        target = tokenizer(reply, add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError("reply is empty: nothing to score")
        with self._lock, torch.inference_mode():
            prompt = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
            window = getattr(model.config, "max_position_embeddings", None)
            if window is not None and prompt.shape[1] + len(target) > window:
                raise ValueError(f"prompt + reply exceed {self.model_name}'s {window} tokens")
            ids = torch.cat([prompt, torch.tensor([target], dtype=prompt.dtype)], dim=1).to(self._device)
            logits = model(ids).logits[0, prompt.shape[1] - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, prompt.shape[1] :], reduction="sum")
        return float(nll), len(target)

    def stream(self, messages: list[Message], max_new_tokens: int | None = None) -> Iterator[str]:
        """Like :meth:`generate`, yielding the text in pieces as it is decoded. The lock is held
        from the first piece until the iterator is exhausted or closed; closing it early stops the
        generation at the next token."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        model, tokenizer = self._load()
        cancelled = threading.Event()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> bool:
                return cancelled.is_set()

        streamer = TextIteratorStreamer(
            tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=self._config.timeout_s
        )
        failures: list[BaseException] = []

        def run(input_ids: Any, kwargs: dict[str, Any]) -> None:
            try:
                with torch.inference_mode():
                    model.generate(input_ids, **kwargs)
            except BaseException as exc:  # handed to the consumer below
                failures.append(exc)
                streamer.end()

        with self._lock:
            input_ids, kwargs = self._prepare(messages, max_new_tokens)
            kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled()]))
            worker = threading.Thread(
                target=run, args=(input_ids, kwargs), name="generator-stream", daemon=True
            )
            worker.start()
            try:
                yield from (piece for piece in streamer if piece)
            finally:
                cancelled.set()
                worker.join()
        if failures:
            raise failures[0]


def _pad_token_id(model: Model, tokenizer: Tokenizer) -> int | None:
    """The id ``generate`` pads with: the model's, the tokenizer's, else end-of-sequence (setting
    it explicitly keeps ``generate`` from warning on every call)."""
    for candidate in (
        model.generation_config.pad_token_id,
        tokenizer.pad_token_id,
        model.generation_config.eos_token_id,
        tokenizer.eos_token_id,
    ):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return None


def _load_dense(location: str, dtype: Any) -> tuple[Model, Tokenizer]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location)
    return AutoModelForCausalLM.from_pretrained(location, dtype=dtype), tokenizer


def _convert_gguf(location: str, gguf_file: str, target: Path) -> tuple[Model, Tokenizer]:
    """Dequantizes ``location/gguf_file`` to a dense fp32 model and saves it (with the tokenizer)
    at ``target`` atomically. A failed save only logs: the model in memory is still good."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    # dequantize=True: plain dense layers even where a GGUF kernel would keep them packed, which
    # save_pretrained refuses to write.
    model: Model = AutoModelForCausalLM.from_pretrained(
        location,
        gguf_file=gguf_file,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True),
    )
    # The weights are dense now; without this, save_pretrained refuses and the saved config would
    # send the next load back through the GGUF path.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    logger.info("converted %s in %.1f s", gguf_file, time.perf_counter() - started)
    _save_atomically(model, tokenizer, target)
    return model, tokenizer


def _save_atomically(model: Model, tokenizer: Tokenizer, target: Path) -> bool:
    """Saves model and tokenizer as the directory ``target``, or leaves a complete ``target``
    another process saved first. Written to a temporary sibling and renamed, so ``target`` is
    complete whenever it exists. False (logged) when it cannot be written: the caller's model is
    still good, and the next start converts again."""
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            logger.info("another process saved %s first; its copy stays", target)
        else:
            logger.info("saved the converted model to %s", target)
        return True
    except OSError as exc:
        logger.warning("cannot save the converted model to %s (%s); it converts again next time", target, exc)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(target: Path, max_age_s: float = 3600.0) -> None:
    """Removes temporary copies of ``target`` that a crashed conversion left (older than
    ``max_age_s``: a live conversion takes seconds to minutes)."""
    now = time.time()
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


class OpenAIChatGenerator:
    """Any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp server, ...).

    - One HTTP request per :meth:`generate`, no retries inside (``max_retries=0``); it lasts at
      most ``config.timeout_s`` seconds. Errors, each naming the URL:
      connection failures, timeouts, 408/409/429 and 5xx raise :class:`RetryableError` (back off
      and call again); other 4xx (bad key, unknown model, bad request) raise :class:`ConfigError`.
    - ``config.api_key`` unset sends ``"none"`` (local servers ignore it; the client needs one).
    - Thread-safe: the ``openai`` client may be shared between threads.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        try:
            import openai
        except ImportError as exc:
            raise ConfigError("llm.backend 'openai' needs the openai package (pip install openai)") from exc
        if not config.base_url:
            raise ConfigError("llm.base_url is required for llm.backend 'openai'")
        self._config = config
        self._openai = openai
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        key = config.api_key.get_secret_value() if config.api_key is not None else "none"
        self._client = openai.OpenAI(
            base_url=config.base_url, api_key=key, timeout=config.timeout_s, max_retries=0
        )

    @property
    def model_name(self) -> str:
        return self._config.model

    def warm_up(self) -> None:
        """Nothing to load; the endpoint is first reached by :meth:`generate` (it may start later)."""

    def count_tokens(self, text: str) -> int:
        """An approximation, ``len(text) // 4 + 1`` (about 4 characters a token for English in
        BPE vocabularies): the endpoint's tokenizer is not available here. It errs high for
        English prose, so budgets built with it rarely overflow."""
        return len(text) // 4 + 1

    def generate(self, messages: list[Message], max_new_tokens: int | None = None) -> Generation:
        """The endpoint's reply to ``messages``; usage mapped to the token counts (0 if absent)."""
        openai = self._openai
        limit = self._config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if limit < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {limit}")
        try:
            response = self._client.chat.completions.create(
                model=self._config.model,
                messages=messages,  # type: ignore[arg-type]  # plain dicts of the documented shape
                max_tokens=limit,
                temperature=self._config.temperature,
            )
        except openai.APIConnectionError as exc:  # timeouts included
            raise RetryableError(f"chat endpoint {self._url} unreachable: {exc}") from exc
        except openai.APIStatusError as exc:
            message = f"chat endpoint {self._url} answered {exc.status_code}: {exc.message}"
            if exc.status_code >= 500 or exc.status_code in (408, 409, 429):
                raise RetryableError(message) from exc
            raise ConfigError(f"{message} (check llm.base_url, llm.model, llm.api_key)") from exc
        if not response.choices:
            raise RetryableError(f"chat endpoint {self._url} returned no choices")
        usage = response.usage
        return Generation(
            text=(response.choices[0].message.content or "").strip(),
            prompt_tokens=usage.prompt_tokens if usage is not None else 0,
            completion_tokens=usage.completion_tokens if usage is not None else 0,
            model=response.model or self._config.model,
        )


def make_generator(config: GeneratorConfig, cache_dir: Path) -> Generator:
    """The backend ``config.backend`` names, not yet warmed up. ``cache_dir``: the settings'
    ``cache_dir`` (converted local models go under ``cache_dir/models``)."""
    if config.backend == "openai":
        return OpenAIChatGenerator(config)
    return LocalGenerator(config, cache_dir)

"""Riverbed's own image-text model: LiT with a locked text tower.

A small ViT, trained from scratch, and a linear projection map images into the vector space of the
index's text embedder (a sentence-transformers model, frozen). Text is never re-learnt, so one
query vector searches passages and images together.

**Text vectors are the text embedder's, not** ``get_text_features``. In transformers'
``VisionTextDualEncoderModel`` that method takes the text tower's *pooler output* (for BERT-like
towers ``tanh(dense(h_CLS))``), while sentence-transformers embeds the index's chunks by *mean
pooling* the token states and L2-normalising them. Those are different vectors, and only the
second is the index's space. So a saved LiT model records the text embedder's id
(:class:`LitRecord`), and :class:`actors.image_model.ImageTextModel` embeds its text queries with
:class:`actors.embedder.Embedder` of that id: exactly the vectors the index holds for the same
text. (``SentenceTransformer(path)`` also loads the directory, but embeds text through
``get_text_features``, outside that space: use ``ImageTextModel``.)

**Image vectors** are ``get_image_features``: the ViT's pooler output through the visual
projection (hidden size -> the text dimension), L2-normalised by the caller. :class:`VisionTower`
is exactly that computation as one module, which is what training fits (against the text
embedder's vectors of the captions) and what :func:`build_lit_model` copies into the saved model.

**Saved layout** (:func:`save_lit_model`), loadable by transformers as is:
``config.json`` + ``model.safetensors`` of a ``VisionTextDualEncoderModel`` (ViT vision tower;
the text embedder's transformer as text tower; text projection = identity, i.e. none), the
processor (``ViTImageProcessorPil`` and the text tokenizer), and ``riverbed_lit.json``.

torch and transformers are imported when used (this module is imported by light code too).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.errors import ConfigError
from schemas.settings import ImageFinetuneConfig

if TYPE_CHECKING:
    import torch
    from transformers import VisionTextDualEncoderModel, ViTConfig, ViTImageProcessorPil

LIT_RECORD = "riverbed_lit.json"
"""The file that makes a model directory a Riverbed LiT model (written last)."""

LOGIT_SCALE_INIT = 2.6592  # log(1 / 0.07), CLIP's initial temperature
LOGIT_SCALE_MAX = 4.6052  # log(100): CLIP's clamp, so the softmax never gets arbitrarily sharp


@dataclass(frozen=True)
class LitRecord:
    """What a saved LiT model is: the text embedder whose space it shares, and how it was made."""

    text_model: str
    """Id of the text embedder (sentence-transformers) that embeds text for this model."""
    dim: int
    """Vector length: the text embedder's dimension."""
    image_size: int
    key: str = ""
    """The hash that names the model in the cache (``actors.models.trained_model_key``)."""
    dataset: str = ""
    """Identity of the training data (package version or content hash, split, cut)."""
    finetune: dict[str, Any] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)
    """The distinct captions it was trained on."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per epoch: loss, validation accuracy, elapsed seconds."""
    train_seconds: float = 0.0
    format: int = 1

    def write(self, directory: Path) -> None:
        (directory / LIT_RECORD).write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")

    @classmethod
    def read(cls, directory: Path) -> LitRecord | None:
        """The record of a LiT model directory; None when ``directory`` holds no record (another
        kind of model). ConfigError when the record is unreadable."""
        path = directory / LIT_RECORD
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not a readable LiT record: {exc}") from exc


def vit_config(finetune: ImageFinetuneConfig) -> ViTConfig:
    """The vision tower's architecture from the training settings (3-channel images)."""
    from transformers import ViTConfig

    return ViTConfig(
        image_size=finetune.image_size,
        patch_size=finetune.patch_size,
        num_channels=3,
        hidden_size=finetune.hidden_size,
        num_hidden_layers=finetune.num_layers,
        num_attention_heads=finetune.num_heads,
        intermediate_size=finetune.hidden_size * finetune.mlp_ratio,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def image_processor(image_size: int) -> ViTImageProcessorPil:
    """Resize (bilinear) to ``image_size`` squared, scale to [0, 1], normalise with mean and std
    0.5 per channel. The PIL backend: it needs no torchvision."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": image_size, "width": image_size})


def _vision_tower_class() -> type[torch.nn.Module]:
    import torch
    from transformers import ViTModel

    class VisionTower(torch.nn.Module):
        """``VisionTextDualEncoderModel.get_image_features`` as one trainable module: the ViT's
        pooler output through the visual projection (not normalised), plus the learnable
        temperature of the contrastive loss."""

        def __init__(self, config: ViTConfig, dim: int) -> None:
            super().__init__()
            self.vision_model = ViTModel(config)
            self.visual_projection = torch.nn.Linear(config.hidden_size, dim, bias=False)
            self.logit_scale = torch.nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            pooled = self.vision_model(pixel_values=pixel_values).pooler_output
            return self.visual_projection(pooled)

    return VisionTower


def vision_tower(finetune: ImageFinetuneConfig, dim: int) -> torch.nn.Module:
    """A freshly initialised vision tower (seed torch first for repeatable weights)."""
    return _vision_tower_class()(vit_config(finetune), dim)


def build_lit_model(tower: Any, text_location: str) -> VisionTextDualEncoderModel:
    """The dual encoder that holds ``tower``'s weights as its vision side and the text embedder
    at ``text_location`` (a sentence-transformers directory) as its text tower, with an identity
    text projection. Its ``get_image_features`` equals ``tower(pixel_values)``."""
    import torch
    from transformers import AutoModel, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    text_model = AutoModel.from_pretrained(text_location)
    dim = int(tower.visual_projection.out_features)
    width = int(text_model.config.hidden_size)
    if width != dim:
        raise ConfigError(f"the vision tower projects to {dim} dimensions, the text model has {width}")
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        tower.vision_model.config, text_model.config, projection_dim=dim
    )
    model = VisionTextDualEncoderModel(config)
    # Weights are copied in after construction: the constructor's own initialisation never
    # touches them.
    model.vision_model.load_state_dict(tower.vision_model.state_dict())
    model.text_model.load_state_dict(text_model.state_dict())
    with torch.no_grad():
        model.visual_projection.weight.copy_(tower.visual_projection.weight)
        model.text_projection.weight.copy_(torch.eye(dim))
        model.logit_scale.copy_(tower.logit_scale.detach().clamp(max=LOGIT_SCALE_MAX))
    return model.eval()


def save_lit_model(
    model: VisionTextDualEncoderModel, text_location: str, record: LitRecord, directory: Path
) -> None:
    """Writes the model, its processor (image processor + the text tokenizer) and ``record``
    (last) into ``directory``."""
    from transformers import AutoTokenizer, VisionTextDualEncoderProcessor

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    images = image_processor(record.image_size)
    tokenizer = AutoTokenizer.from_pretrained(text_location)
    VisionTextDualEncoderProcessor(images, tokenizer).save_pretrained(directory)
    # transformers 5 writes the processor as one processor_config.json; the image processor's own
    # preprocessor_config.json is what AutoImageProcessor and older loaders look for.
    images.save_pretrained(directory)
    record.write(directory)

"""A randomly initialised CLIP with small sizes, saved as a hub model would be: it loads through the
same path as ``openai/clip-vit-base-patch32`` (``images.model`` set to its directory) in a second,
so tests of everything around the image model need no trained one."""

from __future__ import annotations

from pathlib import Path


def save_tiny_clip(directory: Path, tokenizer: str, seed: int = 0) -> Path:
    """Saves the model, its image processor (PIL backend: no torchvision) and ``tokenizer`` (a
    directory or id of a BERT-style tokenizer; its vocabulary sizes the text tower) in
    ``directory``; returns it. Vectors: 24 numbers; images seen at 32x32."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel

    words = AutoTokenizer.from_pretrained(tokenizer)
    config = CLIPConfig(
        text_config={
            "vocab_size": words.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 40,
            "eos_token_id": words.sep_token_id,  # pools at [SEP], as CLIP at its end token
            "pad_token_id": words.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    CLIPModel(config).save_pretrained(directory)
    words.save_pretrained(directory)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(directory)
    return directory

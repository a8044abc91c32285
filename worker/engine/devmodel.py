"""Random-weight CLIPSeg models built offline with the real transformers classes.

`tiny` is for tests and offline smoke runs (a few hundred kB, loads in well under a second).
`full` has the exact architecture of CIDAS/clipseg-rd64-refined, so its timings are the real
checkpoint's; its masks mean nothing. Both are saved with save_pretrained together with a
tokenizer and a processor config, and load through the same code as the hub checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The checkpoint's preprocessing (its preprocessor_config.json): 352x352, ImageNet mean/std.
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=77),
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                       patch_size=16, image_size=96),
        "top": dict(projection_dim=16, extract_layers=[0, 1, 2], reduce_dim=16, decoder_num_attention_heads=2,
                    decoder_intermediate_size=32, conditional_layer=0, use_complex_transposed_convolution=True),
    },
    "full": {
        "text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                     max_position_embeddings=77),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=16, image_size=352),
        "top": dict(projection_dim=512, extract_layers=[3, 6, 9], reduce_dim=64, decoder_num_attention_heads=4,
                    decoder_intermediate_size=2048, conditional_layer=0, use_complex_transposed_convolution=True),
    },
}

DEV_MARKER = "clipmask_dev_model.json"
TINY_LOGIT_GAIN = 0.04


def _byte_vocab() -> list[str]:
    """GPT-2/CLIP byte-to-unicode alphabet: every byte has a printable stand-in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tokenizer_files(directory: Path, *, vocab_size: int = 49408) -> int:
    """Write vocab.json + merges.txt of a character-level CLIP BPE; returns the vocabulary size."""
    chars = _byte_vocab()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(vocab)


def write_dev_model(directory: str | Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """Build and save a random-weight CLIPSeg (model, tokenizer, processor) into `directory`."""
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
    )

    from worker.engine.loading import pil_image_processor_class

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    spec = SIZES[size]
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    vocab_size = build_tokenizer_files(out)
    tokenizer = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"))
    tokenizer.model_max_length = spec["text"]["max_position_embeddings"]
    special = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    assert isinstance(special, list)
    bos, eos = special

    image_size = spec["vision"]["image_size"]
    image_processor = pil_image_processor_class()(
        do_resize=True, size={"height": image_size, "width": image_size}, resample=2,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
    )
    processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)

    text_config = dict(spec["text"], vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    config = CLIPSegConfig(text_config=text_config, vision_config=dict(spec["vision"]), **spec["top"])
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    if size == "tiny":
        # Random init gives the tiny decoder logits in the hundreds (probabilities all 0 or 1); scale its last
        # layer so probabilities spread over (0, 1) and thresholds, boxes and areas get exercised.
        with torch.no_grad():
            last = model.decoder.transposed_convolution[-1]
            last.weight.mul_(TINY_LOGIT_GAIN)
            last.bias.zero_()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / DEV_MARKER).write_text(json.dumps({"size": size, "seed": seed, "random_weights": True}))
    return out


def is_dev_model(directory: str | Path) -> bool:
    return (Path(directory) / DEV_MARKER).exists()

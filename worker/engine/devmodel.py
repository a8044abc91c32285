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


# A tiny SAM 3 with the real classes: every sub-model two layers or fewer, 32 wide, 112 px input (8 x 8
# patches of 14), 20 queries; the text encoder keeps the real 32 positions.
SAM3_TINY_WIDTH = 32
SAM3_TINY_IMAGE = 112
# Random init gives scores near 0.25 (sigmoid(0) x sigmoid(0)) and mask logits near 0: these gains spread
# the query scores, lift the presence and spread the mask logits, so that some instances pass a 0.5
# threshold and masks are cut at 0.5 for real (tests/worker/test_sam3.py asserts both).
SAM3_SCORE_GAIN = 40.0
SAM3_PRESENCE_BIAS = 1.5
SAM3_MASK_GAIN = 8000.0


def sam3_config(size: str = "tiny") -> Any:
    """`Sam3Config()` itself for "full" (the facebook/sam3 architecture), or the tiny test one."""
    from transformers import Sam3Config

    if size == "full":
        return Sam3Config()
    if size != "tiny":
        raise ValueError("size must be tiny or full")
    width, grid = SAM3_TINY_WIDTH, SAM3_TINY_IMAGE // 14
    small = dict(hidden_size=width, num_layers=1, num_attention_heads=2, intermediate_size=2 * width)
    return Sam3Config(
        vision_config=dict(
            fpn_hidden_size=width, backbone_feature_sizes=[[grid * 4] * 2, [grid * 2] * 2, [grid] * 2],
            backbone_config=dict(model_type="sam3_vit_model", hidden_size=width, intermediate_size=2 * width,
                                 num_hidden_layers=2, num_attention_heads=2, image_size=SAM3_TINY_IMAGE,
                                 patch_size=14, pretrain_image_size=SAM3_TINY_IMAGE, window_size=4,
                                 global_attn_indexes=[1])),
        text_config=dict(hidden_size=width, intermediate_size=2 * width, projection_dim=width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32),
        geometry_encoder_config=small, detr_encoder_config=small,
        detr_decoder_config=dict(small, num_queries=20),
        mask_decoder_config=dict(hidden_size=width, num_attention_heads=2),
    )


def write_sam3_dev_model(directory: str | Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """Build and save a random-weight SAM 3 (model, CLIP tokenizer, processor config) into `directory`,
    in the files facebook/sam3 has, so that it loads like the real checkpoint."""
    import torch
    from transformers import CLIPTokenizer, Sam3Model

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = sam3_config(size)
    vocab_size = build_tokenizer_files(out)
    tokenizer = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"))
    tokenizer.model_max_length = 32
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])  # type: ignore[misc]
    if size == "tiny":
        config.text_config.vocab_size = vocab_size
    config.text_config.bos_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id = bos, eos, eos
    torch.manual_seed(seed)
    model = Sam3Model(config).eval()
    if size == "tiny":
        with torch.no_grad():
            query = model.dot_product_scoring.query_proj
            query.weight.mul_(SAM3_SCORE_GAIN)
            query.bias.mul_(SAM3_SCORE_GAIN)
            presence = model.detr_decoder.presence_head.layer3
            presence.weight.mul_(SAM3_SCORE_GAIN)
            presence.bias.fill_(SAM3_PRESENCE_BIAS)
            model.mask_decoder.instance_projection.weight.mul_(SAM3_MASK_GAIN)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image = config.vision_config.backbone_config.image_size
    (out / "processor_config.json").write_text(json.dumps({
        "image_processor": {
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Sam3ImageProcessor",
            "mask_size": {"height": 288, "width": 288}, "resample": 2, "rescale_factor": 1 / 255,
            "size": {"height": image, "width": image},
        },
        "point_pad_value": -10, "processor_class": "Sam3Processor", "target_size": image,
    }, indent=2))
    (out / DEV_MARKER).write_text(json.dumps({"family": "sam3", "size": size, "seed": seed, "random_weights": True}))
    return out

"""Stock SAM 3, run in the reference environment (`make stock-venv`: torch with torchvision, which
Sam3Processor needs): Sam3Processor -> Sam3Model, once per prompt -> post_process_instance_segmentation.
tests/worker/test_sam3.py runs this script there and compares clipmask's engine with what it writes.

usage: python sam3_stock.py MODEL_DIR CASES_JSON OUT_NPZ
CASES_JSON: [{"image": "a.png", "text": "shirt" | null, "boxes": [[x0, y0, x1, y1], ...] | null,
              "box_labels": [1, 0, ...] | null, "threshold": 0.5}, ...]
"""

import json
import sys

import numpy as np
import torch
import torchvision
from PIL import Image
from transformers import Sam3Model, Sam3Processor


def main(model_dir: str, cases_path: str, out_path: str) -> None:
    processor = Sam3Processor.from_pretrained(model_dir)
    model = Sam3Model.from_pretrained(model_dir).eval()
    found: dict[str, np.ndarray] = {}
    with open(cases_path, encoding="utf-8") as handle:
        cases = json.load(handle)
    for n, case in enumerate(cases):
        image = Image.open(case["image"]).convert("RGB")
        kwargs = {}
        if case.get("boxes"):
            kwargs = {"input_boxes": [case["boxes"]], "input_boxes_labels": [case["box_labels"]]}
        inputs = processor(images=image, text=case.get("text"), return_tensors="pt", **kwargs)
        if inputs["input_ids"].shape[1] > 32:
            # stock Sam3Model fails on text past its 32 positions (the processor pads, never truncates):
            # record that, and compare with the same model given the text the tokenizer truncates
            try:
                model(**inputs)
            except ValueError as exc:
                found[f"{n}.crashed"] = np.array(str(exc))
            inputs.update(processor.tokenizer(case["text"], padding="max_length", max_length=32, truncation=True,
                                              return_tensors="pt"))
        with torch.no_grad():
            outputs = model(**inputs)
        result = processor.post_process_instance_segmentation(
            outputs, threshold=case["threshold"], mask_threshold=0.5, target_sizes=[(image.height, image.width)])[0]
        found[f"{n}.pixel_values"] = inputs["pixel_values"][0].numpy()
        found[f"{n}.scores"] = result["scores"].numpy()
        found[f"{n}.masks"] = result["masks"].numpy().astype(bool)
        found[f"{n}.presence"] = outputs.presence_logits.sigmoid()[0].numpy()
    # torchvision's own roi_align on fixed features and boxes (worker/engine/roi_align.py must agree)
    features = torch.arange(2 * 3 * 9 * 11, dtype=torch.float32).view(2, 3, 9, 11).sin()
    boxes = [[[0.5, 1.0, 7.2, 8.9], [-2.0, 3.0, 12.0, 4.0], [6.0, 2.0, 30.0, 8.5]], [[3.0, 3.0, 3.2, 3.1]]]
    found["roi_align.features"] = features.numpy()
    found["roi_align.boxes"] = np.array([[i, *box] for i, image in enumerate(boxes) for box in image], np.float32)
    found["roi_align"] = torchvision.ops.roi_align(features, [torch.tensor(b) for b in boxes], 7).numpy()
    np.savez_compressed(out_path, **found)


if __name__ == "__main__":
    main(*sys.argv[1:4])

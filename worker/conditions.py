"""What each of a job's labels is conditioned on: its phrasings, its example image (a visual
prompt, fetched and decoded under the job image's rules), or a fine-tuned model's learned embedding."""

from __future__ import annotations

from typing import Any

from shared.errors import JobFailure, StorageFailed
from shared.fetch import fetch_image_bytes
from shared.images import decode
from shared.tables import Job
from worker.decoders import Served
from worker.deps import MODEL_INPUT, RunnerDeps
from worker.engine.embed import VisualPrompt
from worker.engine.types import BoxPrompt, LabelKey, LearnedLabel


def label_conditions(labels: list[dict[str, Any]], job: Job, deps: RunnerDeps, *,
                     size: tuple[int, int] = MODEL_INPUT) -> list[LabelKey]:
    """What each label is conditioned on: its phrasings, or its example image fetched and decoded
    under the job image's rules (SSRF guard, byte and pixel caps, the same error codes), kept at
    the model's input `size`. An example by URL is fetched once per worker process a short while
    (deps.examples), not once per job of a batch that shares it."""
    keys: list[LabelKey] = []
    examples = 0
    for label in labels:
        if label.get("source") == "box":
            keys.append(BoxPrompt(tuple(tuple(b) for b in label["boxes"]),
                                  tuple(tuple(b) for b in label.get("negative_boxes", []))))
            continue
        if label.get("source") != "image":
            keys.append(tuple(label["prompts"]))
            continue
        where = f"image_prompts[{examples}]"
        examples += 1
        example = label["example"]

        def load(example: dict[str, Any] = example) -> VisualPrompt:
            data = (deps.storage.get(example["key"]) if "key" in example
                    else fetch_image_bytes(example["image_url"], deps.fetch_policy).data)
            return VisualPrompt.of(decode(data, max_pixels=deps.max_pixels, at_least=size).image, size=size)

        try:
            keys.append(load() if "key" in example else deps.examples.get(example["image_url"], load))
        except StorageFailed:
            raise
        except JobFailure as exc:
            raise type(exc)(f"{where} ({label['name']!r}): {exc.message}", code=exc.code) from exc
    return keys


def with_learned(labels: list[dict[str, Any]], conditions: list[LabelKey],
                 tuned: Served | None) -> list[LabelKey]:
    """A fine-tuned model's own labels conditioned on their learned embeddings, when it has them
    (`clipmask finetune --prompt-tuning`); every other label as it was."""
    if tuned is None or tuned.label_embeddings is None:
        return conditions
    embeddings = tuned.label_embeddings
    return [LearnedLabel(f"{tuned.decoder.revision}:{label['model_label']}", embeddings[label["model_label"]])
            if label.get("source") == "model" else condition
            for label, condition in zip(labels, conditions, strict=True)]


def check_boxes(labels: list[dict[str, Any]], width: int, height: int) -> None:
    """A box prompt past the edges of the decoded image fails the job invalid_box_prompts (the API
    checks the images it holds; an image by URL is known only here)."""
    for index, label in enumerate(label for label in labels if label.get("source") == "box"):
        for kind in ("boxes", "negative_boxes"):
            for box in label.get(kind, []):
                if box[2] > width or box[3] > height:
                    raise JobFailure(f"box_prompts[{index}].{kind}: {box} is outside the {width}x{height} image",
                                     code="invalid_box_prompts")

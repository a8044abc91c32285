"""`clipmask finetune DATASET --preset human_parsing --out DIR`: train CLIPSeg's decoder on a labelled set.

CLIP stays frozen; the decoder (FiLM, reductions, transformer blocks, transposed convolutions:
about 1.1M parameters in rd64) is trained, and with --prompt-tuning one conditional embedding per
label too, initialised from its ensembled phrasings. The recipe starts from the CLIPSeg paper's:
AdamW, learning rate 1e-3 with a cosine schedule to 1e-4, the model's 352x352 input, and a loss of
BCE plus Dice per label, so that rare classes are not drowned by background.

The dataset steers training as its statistics say:
- images are drawn with class-balanced weights (an image weighs as much as its rarest label is rare);
- each image has --variants augmentation variants: itself, its mirror (left_/right_ labels swapped),
  and crops at random scale that keep every labelled pixel, with colour jitter.

The frozen backbone dominates the cost and its output never changes for a given picture, so every
variant's extracted-layer activations are computed once, before the first epoch, and kept on the
CPU (in bf16 when the model's hidden size makes them large); each training step then runs the
decoder alone. A progress bar shows the loss and the validation mIoU; training stops early when the
validation mIoU has not improved for --patience epochs (past the first third of --epochs), and
Ctrl-C keeps the best checkpoint so far.

Writes DIR/clipmask-model.json, DIR/decoder.safetensors and DIR/report/index.html (see
shared/modelfile.py for the format and its checks). `clipmask eval DATASET --model DIR` then scores the
folder the way the worker would run it.
"""

from evaluation.finetune.augment import mirror_lookup, variant
from evaluation.finetune.train import add_command, run, train
from evaluation.finetune.trainer import Settings, Trainer

__all__ = ["Settings", "Trainer", "add_command", "mirror_lookup", "run", "train", "variant"]

"""`clipmask eval`: how good CLIPSeg's masks are on a labelled dataset.

datasets.py  a folder (images/ + masks/ + labels.json) or the Hugging Face parquet layout
scoring.py   per class IoU/precision/recall, mIoU, pixel accuracy, fwIoU, threshold sweeps,
             and the dataset's own statistics, accumulated image by image in fixed memory
predict.py   soft masks from the engine in process, or from a running deployment (--api)
report.py    metrics.json, per_class.csv, PNG plots (matplotlib, Agg) and index.html
run.py       the command: dataset -> predictor -> accumulators -> report, with a progress bar
"""

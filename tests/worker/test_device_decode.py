"""JPEGs decoded by the engine with their batch (worker/engine/jpeg.py): the header read on the
host, the EXIF turn on the device, errors kept per request. No stack: `make gpu-check` runs this
file on a GPU machine as it is (the runner's side is tests/worker/test_runner_device_decode.py).

On this CPU machine the batch decoder is Pillow (`device_decode="on"`), so the path's plumbing is
checked for exact equality with the host decode. nvJPEG's own pixels are checked where CUDA and
torchvision are present; without them that test is skipped.
"""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from shared.errors import ImageInvalid, ImageTooLarge
from shared.images import decode, jpeg_header
from tests.support.engine import jpeg, picture
from worker.engine import FastEngine, SegmentRequest, load_clipseg
from worker.engine.batcher import DynamicBatcher
from worker.engine.jpeg import EncodedJpeg, HostJpegDecoder, decodes_on, jpeg_decoder_for, nvjpeg_available, orient

MODEL_INPUT = (352, 352)


@pytest.mark.unit
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_the_image_as_pillows_exif_transpose(orientation):
    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 255, (5, 8, 3), dtype=np.uint8))
    stored.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(stored))
    got = orient(torch.from_numpy(np.array(stored)).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape and np.array_equal(got, expected)


@pytest.mark.unit
def test_the_header_gives_the_upright_size_and_orientation_without_decoding():
    header = jpeg_header(jpeg(120, 80, orientation=6), max_pixels=10_000)
    assert header is not None and header.stored == (120, 80) and header.orientation == 6
    assert header.size == (80, 120)  # turned by 90 degrees: what the masks' size must be
    assert jpeg_header(jpeg(120, 80), max_pixels=10_000).size == (120, 80)
    grey = jpeg_header(jpeg(30, 20, mode="L"), max_pixels=10_000)
    assert grey is not None and grey.size == (30, 20)


@pytest.mark.unit
def test_what_the_device_should_not_decode_gets_no_header():
    png = io.BytesIO()
    picture(20, 20, seed=1).save(png, "PNG")
    assert jpeg_header(png.getvalue(), max_pixels=10_000) is None
    assert jpeg_header(jpeg(20, 20, mode="CMYK"), max_pixels=10_000) is None  # nvJPEG's RGB would be wrong
    assert jpeg_header(b"\xff\xd8\xff\xe0garbage", max_pixels=10_000) is None  # decode() says why
    assert jpeg_header(b"", max_pixels=10_000) is None


@pytest.mark.unit
def test_the_header_enforces_the_pixel_cap_like_the_decode():
    data = jpeg(120, 80)
    with pytest.raises(ImageTooLarge):
        jpeg_header(data, max_pixels=120 * 80 - 1)
    with pytest.raises(ImageTooLarge):
        decode(data, max_pixels=120 * 80 - 1)


@pytest.mark.unit
def test_the_setting_picks_the_decoder():
    cpu = torch.device("cpu")
    assert jpeg_decoder_for("off", cpu) is None
    assert jpeg_decoder_for("auto", cpu) is None  # no nvJPEG on a CPU: the job threads decode
    assert isinstance(jpeg_decoder_for("on", cpu), HostJpegDecoder)
    with pytest.raises(ValueError):
        jpeg_decoder_for("sometimes", cpu)


def pillow_decode_jpeg(data, mode, device):
    """torchvision's decode_jpeg(list, mode, device) as Pillow would answer it (no torchvision here)."""
    return [torch.from_numpy(np.array(Image.open(io.BytesIO(d.numpy().tobytes())).convert(mode))).permute(2, 0, 1)
            for d in data]


@pytest.mark.unit
def test_a_device_decoder_is_trusted_only_once_it_decodes_the_probe_right():
    cpu = torch.device("cpu")
    assert decodes_on(pillow_decode_jpeg, cpu)

    def refuses(data, mode, device):
        raise RuntimeError("nvjpeg: not supported on this device")

    def swaps_channels(data, mode, device):  # a decoder that hands back BGR
        return [t.flip(0) for t in pillow_decode_jpeg(data, mode, device)]

    assert not decodes_on(refuses, cpu)
    assert not decodes_on(swaps_channels, cpu)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    loaded = load_clipseg(str(tiny_model_dir), device="cpu", dtype="fp32")
    return FastEngine(loaded, text_cache_size=64, jpeg_decoder=HostJpegDecoder())


def encoded(data: bytes) -> EncodedJpeg:
    header = jpeg_header(data, max_pixels=50_000_000)
    assert header is not None
    return EncodedJpeg(data, header, MODEL_INPUT)


@pytest.mark.unit
def test_a_batch_of_encoded_jpegs_gives_the_masks_of_the_host_decode(engine):
    """Mixed batch: JPEGs (one turned by EXIF) beside a decoded array; every mask is the one the
    host path (Pillow's reduced decode in the job thread) gives, at the upright full size."""
    files = [jpeg(1536, 1024, seed=1), jpeg(800, 600, seed=2, orientation=6), jpeg(400, 700, seed=3)]
    prompts = ["shirt", "pants"]
    host = [decode(f, max_pixels=50_000_000, at_least=MODEL_INPUT) for f in files]
    on_device = [SegmentRequest(encoded(f), prompts, 0.4, size=d.size)
                 for f, d in zip(files[:2], host[:2], strict=True)]
    on_device.append(SegmentRequest(np.asarray(host[2].image), prompts, 0.4, size=host[2].size))
    baseline = [SegmentRequest(np.asarray(d.image), prompts, 0.4, size=d.size) for d in host]
    got, want = engine.segment_batch(on_device), engine.segment_batch(baseline)
    assert host[1].size == (600, 800)
    for g, w, d in zip(got, want, host, strict=True):
        assert torch.equal(g.logits, w.logits)
        for gm, wm in zip(g.masks, w.masks, strict=True):
            assert gm.mask.shape == (d.size[1], d.size[0]) and np.array_equal(gm.mask, wm.mask)
            assert (gm.bbox, gm.area_fraction) == (wm.bbox, wm.area_fraction)


@pytest.mark.unit
def test_a_broken_jpeg_fails_its_request_alone(engine):
    good = jpeg(300, 200, seed=4)
    truncated = good[: len(good) // 2]  # the header reads; the pixels don't
    batcher = DynamicBatcher(engine.run_batch, max_batch=8, max_wait_ms=50)
    try:
        futures = [batcher.submit(SegmentRequest(encoded(data), ["shirt"], 0.4))
                   for data in (good, truncated, good)]
        with pytest.raises(ImageInvalid):
            futures[1].result(60)
        assert [f.result(60).masks[0].mask.shape for f in (futures[0], futures[2])] == [(200, 300)] * 2
    finally:
        batcher.close()


@pytest.mark.unit
def test_requests_that_need_host_pixels_refuse_an_encoded_jpeg(engine):
    item = encoded(jpeg(64, 48))
    with pytest.raises(ValueError, match="decoded image"):
        engine.segment_batch([SegmentRequest(item, ["shirt"], 0.4, refine="guided")])
    with pytest.raises(ValueError, match="decoded image"):
        engine.segment_batch([SegmentRequest(item, ["shirt"], 0.4, embed_masks=True)])


# ---- nvJPEG itself, where there is one ----------------------------------------------------------

@pytest.mark.unit
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("torchvision") is None,
                    reason="nvJPEG needs CUDA and torchvision; this machine lacks one (make gpu-check runs it)")
def test_nvjpeg_decodes_like_pillow():
    """nvJPEG against Pillow's full decode of the same files: same upright shape, and pixels within
    a few levels (the IDCT and the chroma upsampling differ between the two libraries)."""
    from worker.engine.jpeg import NvjpegDecoder

    assert nvjpeg_available(torch.device("cuda"))  # the start-up probe passes where nvJPEG works
    decoder = NvjpegDecoder()
    files = [jpeg(1536, 1024, seed=8), jpeg(801, 603, seed=9, orientation=6), jpeg(640, 480, seed=10, mode="L"),
             jpeg(1024, 1536, seed=11, quality=60)]
    truncated = files[0][: len(files[0]) // 2]
    out = decoder.decode([encoded(f) for f in files], torch.device("cuda"))
    for data, image in zip(files, out, strict=True):
        want = np.asarray(decode(data, max_pixels=50_000_000).image).astype(np.int16)
        got = image.permute(1, 2, 0).cpu().numpy().astype(np.int16)
        assert got.shape == want.shape
        diff = np.abs(got - want)
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 16, (diff.mean(), np.percentile(diff, 99))
    assert decoder.fallbacks == 0
    with pytest.raises(ImageInvalid):  # the device refuses it, then Pillow says why
        decoder.decode([encoded(files[1]), encoded(truncated)], torch.device("cuda"))
    assert decoder.fallbacks == 1

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.data import device_decode
from cnnkit.data.images import load_image
from cnnkit.data.loader import Augment, BatchLoader
from cnnkit.data.sources import ImageSet, scan_folder
from cnnkit.errors import UserError

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def photo(w, h, seed):
    """A JPEG-like photo: smooth colour gradients, a bright disc and some grain (fine detail to resample)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 200, y / h * 200, (x + y) / (w + h) * 150 + 50], -1)
    img[(x - w / 2) ** 2 + (y - h / 3) ** 2 < (min(w, h) / 4) ** 2] = 240
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg_folder(root, sizes=((60, 45), (45, 60), (50, 50)), per_class=4, classes=2):
    for c in range(classes):
        os.makedirs(os.path.join(root, f"c{c}"), exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            photo(w, h, seed=10 * c + i).save(os.path.join(root, f"c{c}", f"{i}.jpg"), quality=90)
    files, labels, names = scan_folder(root)
    return files, labels, names


def streamed(root, size=32, channels=3):
    files, labels, names = scan_folder(root)
    return ImageSet(labels, names, files=files, size=size, channels=channels, paths=files)


def loader(data, decode="device", augment=True, batch=4, seed=0, workers=0):
    return BatchLoader(data, batch, [0.5] * data.channels, [0.25] * data.channels, CPU, shuffle=augment,
                       augment=Augment(crop_pad=4, flip=True) if augment else None, seed=seed, workers=workers,
                       decode=decode)


def uint8_batches(data, **kw):
    """The loader's batches back in uint8 pixel units (undoing its normalisation by mean 0.5, std 0.25)."""
    return [((x * 0.25 * 255 + 0.5 * 255).round(), y) for x, y in loader(data, **kw)]


@pytest.mark.parametrize("augment", [True, False])
def test_device_path_gives_float_channels_last_batches_of_the_models_size(tmp_path, augment):
    jpeg_folder(str(tmp_path))
    data = streamed(str(tmp_path), size=24)
    batches = list(loader(data, augment=augment, workers=1))
    assert loader(data).decode_on_device and not loader(data, decode="auto").decode_on_device  # auto: CUDA only
    assert [x.shape for x, _ in batches] == [(4, 3, 24, 24)] * 2
    assert all(x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(data.labels.tolist())


def test_grayscale_models_get_one_channel(tmp_path):
    jpeg_folder(str(tmp_path))
    x, _ = next(iter(loader(streamed(str(tmp_path), size=16, channels=1))))
    assert x.shape == (4, 1, 16, 16)


def test_random_resized_crops_come_from_the_batch_seed(tmp_path):
    jpeg_folder(str(tmp_path))
    data = streamed(str(tmp_path))
    first, again = uint8_batches(data), uint8_batches(data)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = uint8_batches(data, seed=1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    # a resumed epoch: batch 1 on its own is batch 1 of the whole epoch
    resumed = next(loader(data).batches(start=1))[0]
    assert torch.equal(resumed, list(loader(data))[1][0])


def test_random_resized_boxes_follow_torchvisions_rules():
    sizes = torch.tensor([[375, 500], [500, 375], [64, 64], [10, 1000]] * 250)
    boxes = device_decode.random_resized_boxes(sizes, torch.Generator().manual_seed(0))
    left, top, right, bottom = boxes.unbind(1)
    h, w = sizes[:, 0].float(), sizes[:, 1].float()
    assert torch.equal(boxes, boxes.round()) and (left >= 0).all() and (top >= 0).all()
    assert (right <= w).all() and (bottom <= h).all() and (right > left).all() and (bottom > top).all()
    cw, ch = right - left, bottom - top
    drawn = sizes[:, 1] != 1000
    area = (cw * ch / (w * h))[drawn]
    assert area.min() >= 0.07 and area.max() <= 1 and area.min() < 0.15 and area.max() > 0.8
    ratio = (cw / ch)[drawn & (sizes[:, 0] == 375)]
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    # no crop of a 1000 x 10 strip has a ratio within (3/4, 4/3): torchvision's fallback, the centre 13 x 10
    assert boxes[~drawn].tolist() == [[493.0, 0.0, 506.0, 10.0]] * 250
    again = device_decode.random_resized_boxes(sizes, torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)


def test_evaluation_crop_matches_load_image(tmp_path):
    jpeg_folder(str(tmp_path), sizes=((500, 375), (375, 500), (224, 224), (300, 200)), per_class=4, classes=1)
    data = streamed(str(tmp_path), size=224)
    x, _ = uint8_batches(data, augment=False)[0]
    reference = torch.stack([load_image(f, 3, 224) for f in data.files]).float()
    diff = (x - reference).abs()
    # the same pixels up to the resampling filter (a box filter here, Pillow's triangle there) and JPEG decoders
    assert diff.mean() < 1.5 and diff.max() < 40, (diff.mean(), diff.max())
    assert diff[2].max() <= 1  # the 224 x 224 image: no resampling at all, only the decoder


def test_files_the_device_does_not_decode_fall_back_to_pillow(tmp_path):
    jpeg_folder(str(tmp_path), sizes=((60, 45),), per_class=2, classes=2)
    png = os.path.join(str(tmp_path), "c0", "2.png")
    photo(60, 45, seed=5).save(png)
    rotated = os.path.join(str(tmp_path), "c1", "2.jpg")  # EXIF says: rotate on display, which only Pillow does
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    photo(80, 40, seed=6).save(rotated, quality=95, exif=exif)
    data = streamed(str(tmp_path), size=32)
    items = {f: device_decode.FileBytes(data.files, data.labels, 3)[i][0] for i, f in enumerate(data.files)}
    assert items[png].shape == (3, 45, 60) and items[rotated].shape == (3, 80, 40)  # decoded, EXIF applied
    assert items[data.files[0]].dim() == 1  # a plain JPEG travels as bytes
    x, y = uint8_batches(data, augment=False, batch=6)[0]
    assert len(x) == 6 and sorted(y.tolist()) == sorted(data.labels.tolist())
    for f in (png, rotated):
        got = x[data.files.index(f)]
        assert (got - load_image(f, 3, 32).float()).abs().mean() < 2


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_jpeg_broken_after_the_check_is_dropped_like_on_the_cpu_path(tmp_path, damage):
    jpeg_folder(str(tmp_path))
    data = streamed(str(tmp_path))
    victim = data.files[3]
    content = open(victim, "rb").read()
    with open(victim, "wb") as f:  # broken after the pre-training check, as when a file changes on disk
        f.write(content[: len(content) // 2] if damage == "truncated" else b"not a jpeg at all")
    results = {}
    for decode in ("device", "cpu"):
        batches = loader(data, decode=decode, augment=False)
        out = list(batches)
        results[decode] = ([len(x) for x, _ in out], torch.cat([y for _, y in out]).tolist(), batches.skipped)
    assert results["device"] == results["cpu"]
    assert results["device"][0] == [3, 4] and results["device"][2] == 1


def test_cpu_decoding_is_the_default_off_cuda_and_unknown_choices_are_refused(tmp_path):
    jpeg_folder(str(tmp_path / "data"))
    data = streamed(str(tmp_path / "data"))
    assert not loader(data, decode="auto").decode_on_device
    with pytest.raises(UserError, match="--decode"):
        loader(data, decode="gpu")
    with pytest.raises(UserError, match="--decode"):
        cnnkit.train(data=str(tmp_path / "data"), decode="gpu", progress=False, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_training_on_a_streamed_folder_decodes_on_the_device_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_MEMORY_BUDGET", "1")  # too large for memory: streamed from the files
    jpeg_folder(str(tmp_path / "data"), per_class=6)
    r = cnnkit.train(data=str(tmp_path / "data"), decode="device", input_size=24, epochs=1, batch_size=4,
                     val_split=0.25, progress=False, check_data=False, out=str(tmp_path / "run"))
    assert r.num_train == 8 and r.num_val == 4 and 0 <= r.val_acc <= 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["decode"] == "device"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_decode_is_the_cpu_decode_up_to_the_decoders(tmp_path):
    """nvjpeg against libjpeg-turbo."""
    device = torch.device("cuda")
    jpeg_folder(str(tmp_path), sizes=((500, 375), (375, 500)), per_class=4, classes=2)
    data = streamed(str(tmp_path), size=64)
    items = [device_decode.FileBytes(data.files, data.labels, 3)[i] for i in range(len(data))]
    encoded, labels = device_decode.collate(items)
    on_device, _ = device_decode.decode_batch(encoded, labels, data.files, 3, 64, device)
    on_cpu, _ = device_decode.decode_batch(encoded, labels, data.files, 3, 64, CPU)
    assert on_device.device.type == device.type
    assert (on_device.cpu().float() - on_cpu.float()).abs().mean() < 1.5


@pytest.mark.cuda
@cuda
def test_on_cuda_streamed_jpegs_decode_on_the_gpu_by_default(tmp_path):
    jpeg_folder(str(tmp_path))
    data = streamed(str(tmp_path), size=32)
    victim = data.files[0]
    with open(victim, "wb") as f:
        f.write(b"broken")
    device = torch.device("cuda")
    batches = BatchLoader(data, 4, [0.5] * 3, [0.25] * 3, device, shuffle=True, augment=Augment(crop_pad=4, flip=True))
    assert batches.decode_on_device
    out = list(batches)
    assert [len(x) for x, _ in out] == [3, 4] or [len(x) for x, _ in out] == [4, 3]
    assert all(x.device.type == "cuda" and y.device.type == "cuda" for x, y in out) and batches.skipped == 1
    again = list(batches)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(out, again))


@pytest.mark.cuda
@cuda
def test_on_cuda_the_device_path_never_waits_for_the_gpu(tmp_path):
    # A synchronising call (a blocking copy, a mask on the device) would stall the host until the GPU finished
    # the step before: the decode of the next batch would no longer overlap the training of this one.
    jpeg_folder(str(tmp_path), per_class=8)
    data = streamed(str(tmp_path), size=32)
    batches = BatchLoader(data, 4, [0.5] * 3, [0.25] * 3, torch.device("cuda"), shuffle=True,
                          augment=Augment(crop_pad=4, flip=True))
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = list(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [len(x) for x, _ in out] == [4] * 4


def freed_while_read(decode, n=16, rounds=5):
    """How many of ``n`` tensors, freed while kernels queued behind a long one still read them, were overwritten by
    ``decode`` (which decodes ``n`` JPEGs of 500 x 375, the tensors' size) before those kernels ran."""
    device = torch.device("cuda")
    nbytes = 3 * 375 * 500
    wrong = 0
    for _ in range(rounds):
        tensors = [torch.full((nbytes,), 7, dtype=torch.uint8, device=device) for _ in range(n)]
        torch.cuda.synchronize()
        a = torch.randn(4096, 4096, device=device)
        for _ in range(20):  # keeps the stream busy for a while
            a = a @ a / 64
        sums = [t.sum(dtype=torch.int64) for t in tensors]  # queued behind the products
        del tensors
        decode()
        torch.cuda.synchronize()
        wrong += sum(int(s) != 7 * nbytes for s in sums)
    return wrong


@pytest.mark.cuda
@cuda
def test_cuda_decoding_never_writes_memory_that_queued_kernels_still_read(tmp_path):
    # torchvision's decode_jpeg takes its outputs from the current stream's pool and nvjpeg writes them at once,
    # ahead of the kernels queued on that stream (torchvision PR 9606): device_decode decodes on a stream of its own.
    jpeg_folder(str(tmp_path), sizes=((500, 375),), per_class=8, classes=2)
    data = streamed(str(tmp_path), size=224)
    encoded, labels = device_decode.collate([device_decode.FileBytes(data.files, data.labels, 3)[i] for i in range(16)])
    decode = lambda: device_decode.decode_batch(encoded, labels, data.files, 3, 224, torch.device("cuda"))  # noqa: E731
    assert freed_while_read(decode) == 0


def test_the_byte_reading_workers_stay_across_epochs_and_give_the_same_batches(tmp_path):
    jpeg_folder(str(tmp_path), per_class=6)
    data = streamed(str(tmp_path))
    kept = loader(data, workers=1)
    fresh = [loader(data, workers=0) for _ in range(3)]

    def epoch(batches, e, stop=None):
        batches.set_epoch(e)
        out = []
        for x, y in batches:
            out.append((x, y))
            if len(out) == stop:
                break  # an epoch left early: the next one must not see its leftovers
        return out

    runs = [epoch(kept, 0, stop=1), epoch(kept, 1), epoch(kept, 2)]
    expected = [epoch(fresh[0], 0, stop=1), epoch(fresh[1], 1), epoch(fresh[2], 2)]
    for got, want in zip(runs, expected):
        assert len(got) == len(want) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                             for a, b in zip(got, want))
    workers = kept._byte_batches._iterator._workers
    assert kept._byte_batches is not None and all(w.is_alive() for w in workers)
    # an epoch begun while another is under way reads through a DataLoader of its own
    first, second = iter(kept), iter(kept)
    a, b = next(first), next(second)
    assert torch.equal(a[0], b[0]) and len(list(first)) == len(list(second)) == 2


def test_a_streamed_run_records_the_decoding_path_auto_took_and_says_it(tmp_path, monkeypatch):
    # "auto" decides the augmentation of a streamed set (random resized crops when decoded on the device): a run
    # resumed or replayed on a machine of the other kind must train the way it started.
    from cnnkit.checkpoint import load_checkpoint

    monkeypatch.setenv("CNNKIT_MEMORY_BUDGET", "1")
    jpeg_folder(str(tmp_path / "data"), per_class=6)
    log = io.StringIO()
    cnnkit.train(data=str(tmp_path / "data"), input_size=24, epochs=1, batch_size=4, val_split=0.25, workers=1,
                 progress=False, check_data=False, out=str(tmp_path / "run"), log=log)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["decode"] == "cpu"
    assert load_checkpoint(str(tmp_path / "run" / "last.pt")).config["decode"] == "cpu"
    assert "images streamed and decoded by 1 loader process;" in log.getvalue()

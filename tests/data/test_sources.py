import os
import re
import shutil

import numpy as np
import pytest
import torch

from cnnkit.data.sources import DataSpec, load_eval_set, load_splits, scan_folder
from cnnkit.errors import DataError, UserError
from tests.conftest import write_idx, write_image_folder


def test_folder_split_is_stratified_and_deterministic(image_folder):
    train, val = load_splits(DataSpec(image_folder, val_split=0.25))
    train2, val2 = load_splits(DataSpec(image_folder, val_split=0.25))
    assert torch.equal(val.images, val2.images) and torch.equal(train.labels, train2.labels)
    assert torch.bincount(val.labels).tolist() == [2, 2, 2, 2]
    assert len(train) + len(val) == 32
    assert train.images.shape[1:] == (3, 16, 16)
    assert train.classes == ["circle", "square", "triangle", "star"] or train.classes == sorted(train.classes)


def test_folder_default_val_split_and_val_data(tmp_path):
    root = write_image_folder(str(tmp_path / "a"), n_per_class=10)
    other = write_image_folder(str(tmp_path / "b"), n_per_class=3, seed=1)
    train, val = load_splits(DataSpec(root))
    assert len(val) == 4 and len(train) == 36
    train, val = load_splits(DataSpec(root, val_data=other))
    assert len(train) == 40 and len(val) == 12


def test_hidden_folders_and_files_are_ignored(image_folder):
    os.makedirs(os.path.join(image_folder, ".ipynb_checkpoints"))
    open(os.path.join(image_folder, "circle", ".DS_Store"), "w").close()
    files, labels, classes = scan_folder(image_folder)
    assert ".ipynb_checkpoints" not in classes and len(files) == 32


def _put_files_at_the_top(root):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(os.path.join(root, "stray.jpg"))
    for name in ("README.md", "cats.zip", ".DS_Store", "._photo.jpg"):
        open(os.path.join(root, name), "w").close()


def test_files_beside_the_class_folders_are_named_once(image_folder):
    # a stray image (or a zip of them) at the top of the folder belongs to no class: it was left out without a word
    train, val = load_splits(DataSpec(image_folder, val_split=0.25))
    assert train.warnings == [] and val.warnings == []
    _put_files_at_the_top(image_folder)
    train, val = load_splits(DataSpec(image_folder, val_split=0.25))
    assert len(train) + len(val) == 32
    warning, = train.warnings
    assert warning.startswith(f"3 file(s) at the top of {image_folder}, beside its class folders, are not read "
                              "(stray.jpg, README.md and 1 more)") and "move images into" in warning, warning
    assert val.warnings == []  # said once, with the training part
    assert not any(w in warning for w in (".DS_Store", "._photo"))
    _, val = load_splits(DataSpec(image_folder, val_data=image_folder + os.sep))
    assert val.warnings[0].startswith(f"3 file(s) at the top of --val-data {image_folder}")


def test_files_beside_the_class_folders_are_named_once_by_train_and_check_data(tmp_path):
    import io

    import cnnkit
    from tests.conftest import run_cli

    root = write_image_folder(str(tmp_path / "d"))
    _put_files_at_the_top(root)
    log = io.StringIO()
    cnnkit.train(data=root, epochs=1, model="simple_cnn", out=str(tmp_path / "run"), progress=False, log=log)
    lines = [line for line in log.getvalue().splitlines() if "at the top of" in line]
    assert lines == [f"cnnkit: warning: 3 file(s) at the top of {root}, beside its class folders, are not read "
                     f"(stray.jpg, README.md and 1 more): only images inside a class folder are; move images into "
                     f"{os.path.join(root, '<class name>', '')}"], log.getvalue()
    proc = run_cli("check-data", root)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if "at the top of" in line] == [lines[0][len("cnnkit: "):]]


def test_input_size_and_channels_are_applied(image_folder):
    train, _ = load_splits(DataSpec(image_folder, input_size=20, channels=1))
    assert train.images.shape[1:] == (1, 20, 20)


def test_second_load_uses_the_cache(image_folder):
    load_splits(DataSpec(image_folder))
    from cnnkit.data import cache

    cache._MEMORY.clear()
    before = len(os.listdir(cache.cache_dir()))
    load_splits(DataSpec(image_folder))
    assert len(os.listdir(cache.cache_dir())) == before
    # Content changes make a new entry.
    os.remove(os.path.join(image_folder, "circle", "001.png"))
    cache._MEMORY.clear()
    train, val = load_splits(DataSpec(image_folder))
    assert len(train) + len(val) == 31


def test_too_large_for_memory_streams_from_files(image_folder, monkeypatch):
    monkeypatch.setenv("CNNKIT_MEMORY_BUDGET", "1")
    train, val = load_splits(DataSpec(image_folder))
    assert train.images is None and len(train.files) == len(train)


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "does not exist"),
    (lambda root: os.makedirs(root), "is empty"),
    # files but no image and no sub-folder: it said "is empty" of a folder that was not
    (lambda root: (os.makedirs(root), open(os.path.join(root, "notes.txt"), "w").close()),
     r"^\S+ holds no class sub-folders, only 1 file\(s\) that are not images \(notes.txt\)"),
    (lambda root: (os.makedirs(root), open(os.path.join(root, "a.png"), "wb").close()), "no class sub-folders"),
    (lambda root: (os.makedirs(os.path.join(root, "cat")), os.makedirs(os.path.join(root, "dog"))), "no images"),
])
def test_bad_folders_are_user_errors(tmp_path, make, message):
    root = str(tmp_path / "data")
    make(root)
    with pytest.raises(UserError, match=message):
        load_splits(DataSpec(root))


def test_a_class_folder_of_a_good_data_folder_points_at_the_data_folder(image_folder):
    # `--data photos/cat`: the error said to put cat's images in photos/cat/<class name>/, though photos/ was right
    cat = os.path.join(image_folder, "circle")
    classes = ", ".join(sorted(os.listdir(image_folder))[:3])
    with pytest.raises(UserError, match=rf"^{re.escape(cat)} holds images but no class sub-folders: it looks like one "
                                        rf"class's folder; pass the folder above it, {re.escape(image_folder)}, "
                                        rf"whose sub-folders \({re.escape(classes)}(, \.\.\.)?\) are the classes$"):
        load_splits(DataSpec(cat))
    os.makedirs(os.path.join(image_folder, "notes"))  # a sub-folder without images: the folder above is no data
    with pytest.raises(UserError, match=rf"^{re.escape(cat)} holds images but no class sub-folders; put each class's "
                                        rf"images in {re.escape(cat)}/<class name>/$"):
        load_splits(DataSpec(cat))


def test_a_class_folder_given_as_the_data_is_named_not_taken_for_one_class(image_folder):
    # a class's folder with a sub-folder of one image: the 8 loose images were left out without a word, and the
    # error was about the one "class" having too few images
    cat = os.path.join(image_folder, "circle")
    os.makedirs(os.path.join(cat, "nested"))
    os.replace(os.path.join(cat, sorted(os.listdir(cat))[0]), os.path.join(cat, "nested", "a.png"))
    with pytest.raises(UserError, match=rf"^{re.escape(cat)} holds \d+ images of its own, which cnnkit does not read, "
                                        rf"and 1 in its sub-folder\(s\) \(nested\).*perhaps {re.escape(image_folder)}\)"):
        load_splits(DataSpec(cat))
    # a stray image beside real class folders stays ignored, as torchvision's ImageFolder ignores it
    shutil.copy(os.path.join(cat, "nested", "a.png"), os.path.join(image_folder, "stray.png"))
    os.replace(os.path.join(cat, "nested", "a.png"), os.path.join(cat, "a.png"))
    os.rmdir(os.path.join(cat, "nested"))
    train, val = load_splits(DataSpec(image_folder))
    assert len(train) + len(val) == 32


def test_a_val_split_near_1_leaves_each_class_a_training_image(image_folder):
    # --val-split 0.99 held out every image of classes under 50, and training failed on the empty set
    train, val = load_splits(DataSpec(image_folder, val_split=0.99))
    assert sorted(set(train.labels.tolist())) == list(range(len(train.classes)))
    assert len(train) == len(train.classes) and len(train) + len(val) == 32


def test_empty_class_folder_is_an_error(image_folder):
    os.makedirs(os.path.join(image_folder, "zebra"))
    with pytest.raises(UserError, match="zebra"):
        load_splits(DataSpec(image_folder))


def test_undecodable_image_is_skipped_and_listed_or_named_as_error(image_folder):
    bad = os.path.join(image_folder, "circle", "zzz.jpg")
    open(bad, "w").write("not a jpeg")
    train, val = load_splits(DataSpec(image_folder))
    assert len(train) + len(val) == 32
    assert len(train.skipped + val.skipped) == 1 and "zzz.jpg" in (train.skipped + val.skipped)[0]
    with pytest.raises(DataError, match="zzz.jpg"):
        load_splits(DataSpec(image_folder, bad_images="error"))


def test_val_split_out_of_range():
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(UserError, match="val-split"):
            load_splits(DataSpec("shapes", val_split=bad))


def test_shapes_source_sizes():
    train, val = load_splits(DataSpec("shapes", num_samples=300, input_size=28, channels=1))
    assert train.images.shape == (300, 1, 28, 28) and len(val) == 2000
    assert train.classes[0] == "circle"


def test_mnist_is_read_through_torchvision_from_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    raw = str(tmp_path / "MNIST" / "raw")
    write_idx(raw, "train", rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), (np.arange(50) % 10).astype(np.uint8))
    write_idx(raw, "t10k", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), (np.arange(20) % 10).astype(np.uint8))
    train, val = load_splits(DataSpec("mnist", data_dir=str(tmp_path)))
    assert train.images.shape == (50, 1, 28, 28) and len(val) == 20  # val is the official test split
    assert train.classes[0].startswith("0")
    train, val = load_splits(DataSpec("mnist", data_dir=str(tmp_path), val_split=0.2, channels=3, input_size=32))
    assert train.images.shape == (40, 3, 32, 32) and len(val) == 10
    assert len(load_eval_set(DataSpec("mnist", data_dir=str(tmp_path)))) == 20


def test_missing_torchvision_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(UserError) as e:
        load_splits(DataSpec("cifar10", data_dir=str(tmp_path)))
    text = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in text and "--download" in text and "--data-dir" in text


@pytest.mark.parametrize("given", [True, False])
def test_a_failed_download_names_the_folder_and_the_option_only_where_it_was_given(tmp_path, monkeypatch, given):
    # with the default folder (CNNKIT_DATA here), "pass --data-dir" named the folder cnnkit reads anyway
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path / "default"))
    root = str(tmp_path / ("given" if given else "default"))
    with pytest.raises(DataError) as e:
        load_splits(DataSpec("cifar10", data_dir=root if given else None, download=True))
    text = str(e.value)
    assert f"copy the dataset files to {os.path.join(root, 'cifar-10-batches-py')}" in text
    assert text.endswith(f" and pass --data-dir {root}") == given, text


def test_cache_entry_of_another_layout_is_rebuilt(image_folder):
    from cnnkit.data import cache

    load_splits(DataSpec(image_folder))
    cache._MEMORY.clear()
    for name in os.listdir(cache.cache_dir()):  # as an older cnnkit would have written them
        torch.save({"images": torch.zeros(1)}, os.path.join(cache.cache_dir(), name))
    train, val = load_splits(DataSpec(image_folder))
    assert len(train) + len(val) == 32 and train.images.shape[1:] == (3, 16, 16)


def test_damaged_cifar_files_are_named_damaged_not_missing(tmp_path):
    # the right file names in the right folder, but not torchvision's bytes (its MD5 check fails)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(UserError) as e:
        load_splits(DataSpec("cifar10", data_dir=str(tmp_path)))
    text = str(e.value)
    assert "damaged" in text and "failed torchvision's check" in text and "not found in" not in text
    assert f"delete {folder}" in text and "--download" in text and "\n" not in text
    assert e.value.exit_code == 1  # damaged files, not a usage error: it exited with 2


def test_truncated_mnist_file_is_named_damaged(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(str(raw), "train", rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), (np.arange(50) % 10).astype(np.uint8))
    write_idx(str(raw), "t10k", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), (np.arange(20) % 10).astype(np.uint8))
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    for download in (False, True):  # with --download too: torchvision downloads only the files that are missing
        with pytest.raises(UserError) as e:
            load_splits(DataSpec("mnist", data_dir=str(tmp_path), download=download))
        text = str(e.value)
        assert "damaged" in text and f"delete {raw}" in text and "--download" in text and "\n" not in text
        assert e.value.exit_code == 1


def test_mnist_label_beyond_its_classes_is_a_user_error(tmp_path):
    rng = np.random.default_rng(0)
    raw = str(tmp_path / "MNIST" / "raw")
    labels = (np.arange(50) % 10).astype(np.uint8)
    labels[7] = 12
    write_idx(raw, "train", rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), labels)
    write_idx(raw, "t10k", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), (np.arange(20) % 10).astype(np.uint8))
    with pytest.raises(UserError) as e:
        load_splits(DataSpec("mnist", data_dir=raw.rsplit("/MNIST", 1)[0]))
    text = str(e.value)
    assert "labels include 12" in text and "10 classes" in text and f"delete {raw}" in text and "--download" in text
    assert e.value.exit_code == 1  # a damaged file, not a usage error: it exited with 2


def test_a_folder_of_train_and_val_splits_is_not_taken_as_two_classes(tmp_path):
    ds = tmp_path / "ds"
    write_image_folder(str(ds / "train"), n_per_class=4, classes=2)
    write_image_folder(str(ds / "val"), n_per_class=2, classes=2, seed=1)
    fix = f"pass {ds / 'train'} as the data and {ds / 'val'} as --val-data"
    with pytest.raises(UserError, match=f"holds the splits train, val, each a folder of class folders.*; {fix}"):
        load_splits(DataSpec(str(ds)))
    with pytest.raises(UserError, match=f"^--val-data {ds} holds the splits"):
        load_splits(DataSpec(str(ds / "train"), val_data=str(ds)))
    train, val = load_splits(DataSpec(str(ds / "train"), val_data=str(ds / "val")))  # as the message says
    assert train.classes == val.classes == ["circle", "square"]
    # classes that happen to be called so, holding their images, are classes
    write_image_folder(str(tmp_path / "named"), n_per_class=4, classes=2)
    os.rename(tmp_path / "named" / "circle", tmp_path / "named" / "train")
    os.rename(tmp_path / "named" / "square", tmp_path / "named" / "test")
    assert scan_folder(str(tmp_path / "named"))[2] == ["test", "train"]


def test_raising_the_pixel_limit_reads_the_image_it_left_out(tmp_path, monkeypatch):
    # the message says "set CNNKIT_MAX_PIXELS to allow larger images", but the cache entry made under the lower
    # limit (same files, same size and mtime) kept the image out: the limit is part of the entry's key
    from PIL import Image

    root = write_image_folder(str(tmp_path / "d"))
    Image.new("RGB", (200, 200), (9, 9, 9)).save(os.path.join(root, "circle", "large.png"))
    monkeypatch.setenv("CNNKIT_MAX_PIXELS", str(100 * 100))
    train, val = load_splits(DataSpec(root, input_size=16))
    assert len(train) + len(val) == 32 and "over the limit" in train.skipped[0]
    monkeypatch.setenv("CNNKIT_MAX_PIXELS", str(200 * 200))
    train, val = load_splits(DataSpec(root, input_size=16))
    assert len(train) + len(val) == 33 and not train.skipped


def test_a_cache_entry_of_an_older_decoder_is_not_reused(tmp_path):
    # a dark 16-bit image decoded as 8-bit (too bright) was cached under its files, size and channels: once the
    # decoder read it right, the same folder kept the bright pixels of the entry made before
    from PIL import Image

    from cnnkit.data import cache
    from cnnkit.data.images import max_pixels

    root = write_image_folder(str(tmp_path / "d"))
    path = os.path.join(root, "circle", "dark.png")
    Image.fromarray(np.full((16, 16), 200, dtype=np.uint16)).save(path)
    spec = DataSpec(root, input_size=16, val_split=0.25)
    files = scan_folder(root)[0]
    old_key = {"source": "folder", "files": cache.files_fingerprint(root, files), "size": 16, "channels": 3,
               "max_pixels": max_pixels()}
    bright = {"images": torch.full((len(files), 3, 16, 16), 200, dtype=torch.uint8),
              "ok": torch.ones(len(files), dtype=torch.bool), "errors": []}
    cache.cached(old_key, lambda: bright)  # as the older version stored it
    cache._MEMORY.clear()
    train, val = load_splits(spec)
    data = train if path in train.paths else val
    assert int(data.images[data.paths.index(path)].max()) <= 1  # 200 of 65535


def test_an_image_replaced_keeping_its_size_and_modification_time_is_decoded_again(tmp_path):
    # an uncompressed BMP has one length for one size: restored over with cp -p / tar / rsync -t, the file kept the
    # size and mtime its cache entry was keyed by, and training read the old pixels
    from PIL import Image

    root = write_image_folder(str(tmp_path / "d"))
    path = os.path.join(root, "circle", "x.bmp")
    Image.new("RGB", (16, 16), (0, 0, 0)).save(path)
    mtime = os.stat(path).st_mtime_ns
    train, val = load_splits(DataSpec(root, input_size=16, val_split=0.25))
    Image.new("RGB", (16, 16), (255, 255, 255)).save(path)
    os.utime(path, ns=(mtime, mtime))
    train2, val2 = load_splits(DataSpec(root, input_size=16, val_split=0.25))
    i = (train2.paths if path in train2.paths else val2.paths).index(path)
    assert int((train2.images if path in train2.paths else val2.images)[i].min()) == 255


def test_a_linked_folder_inside_a_class_folder_is_read_once_and_a_link_up_is_not(tmp_path):
    # training left the images of cat/more -> elsewhere out without a word, while predict read them
    root = write_image_folder(str(tmp_path / "d"))
    elsewhere = write_image_folder(str(tmp_path / "e"))
    os.symlink(os.path.join(elsewhere, "circle"), os.path.join(root, "circle", "more"))
    os.symlink("..", os.path.join(root, "circle", "up"))  # the data folder again: neither a loop nor other classes
    files, labels, classes = scan_folder(root)
    assert len(files) == 32 + 8
    assert torch.bincount(labels).tolist() == [8 + 8, 8, 8, 8]
    assert sum("/more/" in f for f in files) == 8 and not any("/up/" in f for f in files)


def test_a_class_folder_that_is_a_broken_link_is_an_error_not_a_class_left_out(tmp_path):
    # frog -> an unmounted disk: the class was left out without a word, and the model trained on the others
    root = write_image_folder(str(tmp_path / "d"))
    os.symlink(str(tmp_path / "gone"), os.path.join(root, "frog"))
    with pytest.raises(UserError, match=f"class folder {re.escape(os.path.join(root, 'frog'))} is a symbolic link to "
                                        f"{re.escape(str(tmp_path / 'gone'))}, which does not exist; fix the link"):
        load_splits(DataSpec(root))
    with pytest.raises(UserError, match=f"^--val-data {re.escape(root)}: class folder"):
        load_splits(DataSpec(write_image_folder(str(tmp_path / "t")), val_data=root))


def test_a_data_dir_that_is_a_file_is_named_so_not_a_network_failure(tmp_path, monkeypatch):
    # --download into it failed on makedirs, and the message said to check the network
    path = tmp_path / "data"
    path.write_text("")
    for download in (False, True):
        with pytest.raises(UserError, match=f"^--data-dir {re.escape(str(path))} is a file, not a folder") as e:
            load_splits(DataSpec("mnist", data_dir=str(path), download=download))
        assert not isinstance(e.value, DataError) and "network" not in str(e.value)
    monkeypatch.setenv("CNNKIT_DATA", str(path))
    with pytest.raises(UserError, match="is a file, not a folder; set CNNKIT_DATA to a folder, or pass --data-dir"):
        load_splits(DataSpec("cifar10"))


def test_a_failed_download_names_its_cause_not_only_the_file(tmp_path, monkeypatch):
    # torchvision's MNIST error is three lines; the first alone ("Error downloading X:") said nothing of why
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://example/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError, match=r"\(Error downloading train-images-idx3-ubyte.gz: <urlopen error \[Errno -2\] "
                                        r"Name or service not known>\); check the network"):
        load_splits(DataSpec("mnist", data_dir=str(tmp_path), download=True))


def test_a_failed_download_removes_what_it_made_and_only_that(tmp_path, monkeypatch):
    # it left an empty MNIST/raw behind (and the data folder made for it), which the next run without --download
    # took for the files of mnist
    import torchvision

    def offline(root, train, download):  # as torchvision's MNIST does: the folder, a partial file, then the error
        raw = os.path.join(root, "MNIST", "raw")
        os.makedirs(raw, exist_ok=True)
        with open(os.path.join(raw, "train-images-idx3-ubyte.gz"), "wb") as f:
            f.write(b"partial")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n<urlopen error [Errno -2]>")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    made = tmp_path / "made"
    with pytest.raises(DataError, match="could not download mnist"):
        load_splits(DataSpec("mnist", data_dir=str(made / "datasets"), download=True))
    assert os.listdir(tmp_path) == []
    # a folder there before keeps what it held, empty folders included
    kept = tmp_path / "kept"
    (kept / "MNIST").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="could not download mnist"):
        load_splits(DataSpec("mnist", data_dir=str(kept), download=True))
    assert sorted(os.listdir(kept)) == ["MNIST", "notes.txt"] and os.listdir(kept / "MNIST") == []
    with pytest.raises(UserError) as e:
        load_splits(DataSpec("fashion_mnist", data_dir=str(kept)))
    assert "holds the files of mnist" not in str(e.value)


def test_a_folder_of_torchvision_files_given_as_images_names_the_dataset_and_data_dir(tmp_path):
    # it said "no images found under its class folders (MNIST...)", and not which options read those files
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(str(raw), "train", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), (np.arange(20) % 10).astype(np.uint8))
    write_idx(str(raw), "t10k", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), (np.arange(10) % 10).astype(np.uint8))
    (tmp_path / "cifar-10-batches-py").mkdir()
    fix = {"mnist": f"pass mnist as the data, with --data-dir {tmp_path} (to train: cnnkit train --data mnist "
                    f"--data-dir {tmp_path})", "cifar10": f"--data cifar10 --data-dir {tmp_path})"}
    for given, name in ((raw, "mnist"), (raw.parent, "mnist"), (tmp_path / "cifar-10-batches-py", "cifar10")):
        with pytest.raises(UserError, match=f"^{re.escape(str(given))} holds torchvision's {name} files, not class "
                                            f".*{re.escape(fix[name])}"):
            load_splits(DataSpec(str(given)))
    with pytest.raises(UserError, match=f"^--val-data {re.escape(str(raw))} holds torchvision's mnist files"):
        load_splits(DataSpec(write_image_folder(str(tmp_path / "images")), val_data=str(raw)))
    assert len(load_splits(DataSpec("mnist", data_dir=str(tmp_path)))[0]) == 20  # what the message says reads them


def test_a_data_dir_holding_another_built_in_dataset_says_so(tmp_path):
    rng = np.random.default_rng(0)
    raw = str(tmp_path / "MNIST" / "raw")
    write_idx(raw, "train", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), (np.arange(20) % 10).astype(np.uint8))
    write_idx(raw, "t10k", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), (np.arange(10) % 10).astype(np.uint8))
    with pytest.raises(UserError, match=f"^fashion_mnist not found in {re.escape(str(tmp_path))}/FashionMNIST/raw "
                                        f"\\({re.escape(str(tmp_path))} holds the files of mnist: pass mnist as the "
                                        "data if that is the one meant\\); run with --download"):
        load_splits(DataSpec("fashion_mnist", data_dir=str(tmp_path)))
    with pytest.raises(UserError) as e:  # nothing else there: no such words
        load_splits(DataSpec("cifar10", data_dir=str(tmp_path / "MNIST")))
    assert "holds the files" not in str(e.value)


def test_class_names_in_either_unicode_form_are_one_class(tmp_path):
    # a validation folder named on macOS (NFD) against training folders named elsewhere (NFC): "has class(es)
    # chat ü that the training data does not have (its classes: chat ü, ...)"
    import unicodedata

    train_root = write_image_folder(str(tmp_path / "train"), n_per_class=3, classes=2)
    val_root = write_image_folder(str(tmp_path / "val"), n_per_class=2, classes=2, seed=1)
    for root, form in ((train_root, "NFC"), (val_root, "NFD")):
        os.rename(os.path.join(root, "circle"), os.path.join(root, unicodedata.normalize(form, "chat ü")))
    train, val = load_splits(DataSpec(train_root, val_data=val_root))
    assert val.classes == train.classes and unicodedata.normalize("NFC", "chat ü") in train.classes
    assert torch.bincount(val.labels, minlength=2).tolist() == [2, 2]


def test_a_moved_folder_names_its_broken_images_where_they_are_now(tmp_path, monkeypatch):
    # a move keeps every file's size, mtime and ctime: the cache entry made before it named the old paths
    from cnnkit.data import cache

    monkeypatch.setenv("CNNKIT_CACHE", str(tmp_path / "cache"))
    first = write_image_folder(str(tmp_path / "before"))
    (tmp_path / "before" / "circle" / "bad.jpg").write_bytes(b"not an image")
    train, _ = load_splits(DataSpec(first))
    assert str(tmp_path / "before" / "circle" / "bad.jpg") in train.skipped[0]
    entries = sorted(os.listdir(tmp_path / "cache"))
    os.rename(first, tmp_path / "after")
    cache._MEMORY.clear()  # from the disk, as a new process would
    train, _ = load_splits(DataSpec(str(tmp_path / "after")))
    assert str(tmp_path / "after" / "circle" / "bad.jpg") in train.skipped[0] and "before" not in train.skipped[0]
    assert sorted(os.listdir(tmp_path / "cache")) == entries  # the same entry, not decoded again


@pytest.mark.parametrize("data, meant", [
    ("fashion-mnist", "fashion_mnist"), ("FashionMNIST", "fashion_mnist"), ("CIFAR10", "cifar10"),
    ("cifar-10", "cifar10"), ("Mnist", "mnist"), ("cifar_100", "cifar100"),
])
def test_a_dataset_name_spelled_otherwise_is_named_in_the_error(tmp_path, monkeypatch, data, meant):
    # the names stay exact (a folder may be called Mnist), but the one-line error names the dataset meant
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"^data path {data} does not exist .*; did you mean {meant}\\?$"):
        load_splits(DataSpec(data))


@pytest.mark.parametrize("data", ["photos", "/no/such/cifar-10"])
def test_a_folder_path_is_not_taken_for_a_dataset_name(tmp_path, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_splits(DataSpec(data))
    assert "did you mean" not in str(e.value)

"""`ImageCaptionDataset`, `Collator` and `train_val_split`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.utils import send_to_device
from PIL import Image
from torch.utils.data import DataLoader

import multimodal.data as data_module
from multimodal.annotations import read_annotations
from multimodal.data import Collator, ImageCaptionDataset, subsample_rows, train_val_split
from multimodal.engine import all_images_ok, model_inputs
from multimodal.images import ImageLoadError, build_transform
from multimodal.labels import LabelCodec
from multimodal.text import PAD_ID, train_caption_tokenizer

SIZE = 32


@pytest.fixture()
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "train.csv").write_text(
        "ImageID,Labels,Caption\n"
        '0.jpg,1,"A man with a dog."\n'
        '1.jpg,1 3,"Two men in a car."\n'
        '2.jpg,19,""\n'
        '3.jpg,3 19 1,"A car, a horse and a man."\n'
    )
    return tmp_path


@pytest.fixture()
def parts(folder):
    frame = read_annotations(folder / "train.csv")
    codec = LabelCodec.from_labels(frame["Labels"])
    tokenizer = train_caption_tokenizer(frame["Caption"])
    transform = build_transform("tf_efficientnet_lite0", SIZE, training=False)
    return frame, codec, tokenizer, transform


def test_sample_and_batch(folder, parts):
    frame, codec, tokenizer, transform = parts
    dataset = ImageCaptionDataset(frame, folder, codec, tokenizer, transform)
    sample = dataset[3]
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["image_ok"] and sample["error"] is None
    assert sample["image_id"] == "3.jpg" and sample["index"] == 3
    assert sample["label_seq"] == [0, 1, 2, codec.end_index]  # 1 (3 images), 3 (2), 19 (2): frequent first
    torch.testing.assert_close(sample["targets"], torch.ones(3))

    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=Collator())))
    keys = {"image", "image_ok", "all_images_ok", "error", "caption_ids", "caption_lengths", "caption_lengths_host",
            "targets", "label_seq", "index", "image_id"}
    assert set(batch) == keys
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["image_ok"].dtype == torch.bool and batch["image_ok"].all() and batch["all_images_ok"] is True
    assert batch["caption_lengths"].tolist() == [6, 6, 0, 9]
    # Host-side copies (plain Python values, which device placement leaves where they are) for the training loop.
    assert batch["caption_lengths_host"] == [6, 6, 0, 9]
    moved = send_to_device(batch, "meta")  # what Accelerate does to a batch, here to a device without data
    assert moved["caption_lengths"].device.type == "meta" and moved["caption_lengths_host"] == [6, 6, 0, 9]
    inputs = model_inputs(moved)
    assert inputs["caption_lengths"].device.type == "cpu" and inputs["caption_lengths"].tolist() == [6, 6, 0, 9]
    assert moved["all_images_ok"] is True and all_images_ok(moved)
    assert batch["caption_ids"].shape == (4, 9) and batch["caption_ids"].dtype == torch.long
    assert batch["caption_ids"][2].eq(PAD_ID).all() and batch["caption_ids"][0, 6:].eq(PAD_ID).all()
    assert batch["caption_ids"][0, :6].ne(PAD_ID).all()
    assert batch["targets"].shape == (4, 3) and batch["targets"].dtype == torch.float32
    assert batch["label_seq"].tolist() == [[0, 3, -100, -100], [0, 1, 3, -100], [2, 3, -100, -100], [0, 1, 2, 3]]
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["image_id"] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]


def test_caption_only_and_unlabelled(folder, parts):
    frame, codec, tokenizer, _ = parts
    caption_only = Collator()([ImageCaptionDataset(frame, codec=codec, tokenizer=tokenizer)[i] for i in range(2)])
    assert "image" not in caption_only and caption_only["targets"].shape == (2, 3)
    test_frame = frame.drop(columns="Labels")
    unlabelled = Collator()([ImageCaptionDataset(test_frame, codec=codec, tokenizer=tokenizer)[i] for i in range(2)])
    assert "targets" not in unlabelled and "label_seq" not in unlabelled and unlabelled["caption_ids"].shape[0] == 2


def test_max_caption_length(parts):
    frame, _, tokenizer, _ = parts
    dataset = ImageCaptionDataset(frame, tokenizer=tokenizer, max_caption_length=4)
    assert [len(dataset[i]["caption_ids"]) for i in range(4)] == [4, 4, 0, 4]


@pytest.mark.parametrize("content", [None, b"garbage", "truncated"], ids=["missing", "corrupt", "truncated"])
def test_bad_image_raises_naming_file_and_row(folder, parts, content):
    frame, codec, tokenizer, transform = parts
    path = folder / "2.jpg"
    if content is None:
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:300] if content == "truncated" else content)
    dataset = ImageCaptionDataset(frame, folder, codec, tokenizer, transform)
    with pytest.raises(ImageLoadError) as info:
        dataset[2]
    assert str(info.value).startswith(f"{path}: data row 3 (ImageID '2.jpg'): ")

    skipping = ImageCaptionDataset(frame, folder, codec, tokenizer, transform, skip_bad_images=True)
    sample = skipping[2]
    assert not sample["image_ok"] and str(path) in sample["error"] and "data row 3" in sample["error"]
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].eq(0).all()
    assert sample["targets"].sum() == 1  # the rest of the sample is intact
    batch = Collator()([skipping[i] for i in range(4)])
    assert batch["image_ok"].tolist() == [True, True, False, True]


def test_check_images_lists_missing_files_with_rows(folder, parts):
    frame, *_ = parts
    dataset = ImageCaptionDataset(frame, folder)
    assert dataset.check_images() == []
    (folder / "1.jpg").unlink()
    (folder / "3.jpg").unlink()
    assert dataset.check_images(strict=False) == [(1, "1.jpg", folder / "1.jpg", "file not found"),
                                                  (3, "3.jpg", folder / "3.jpg", "file not found")]
    with pytest.raises(ImageLoadError, match=r"2 image file\(s\) missing: data row 2 \(ImageID '1.jpg'\): "
                                             r".*1.jpg: file not found; data row 4"):
        dataset.check_images()
    assert ImageCaptionDataset(frame).check_images() == []


@pytest.mark.parametrize("workers", [1, 3])
def test_check_images_decoding_finds_every_corrupt_and_truncated_file(folder, parts, workers, monkeypatch):
    frame, *_ = parts
    monkeypatch.setattr(data_module, "CHECK_CHUNK", 1)  # a task per image: the threads' results are put back in order
    dataset = ImageCaptionDataset(frame, folder)
    drafts = []
    load = data_module.load_image
    monkeypatch.setattr(data_module, "load_image", lambda path, draft_size=None: drafts.append(draft_size) or
                        load(path, draft_size))
    assert dataset.check_images(decode=True, workers=workers) == []
    (folder / "0.jpg").write_bytes((folder / "0.jpg").read_bytes()[:300])  # truncated
    (folder / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    assert drafts == [1] * 4  # decoded at the smallest scale the decoder offers
    assert dataset.check_images() == []  # the files exist: only decoding finds them
    bad = dataset.check_images(strict=False, decode=True, workers=workers)
    assert [(row, image_id) for row, image_id, _, _ in bad] == [(0, "0.jpg"), (2, "2.jpg")]
    assert "truncated" in bad[0][3].lower() and bad[1][3].startswith("cannot decode image")
    with pytest.raises(ImageLoadError, match=r"2 image\(s\) cannot be decoded: data row 1 \(ImageID '0.jpg'\): .*"
                                             r"cannot decode image.*; data row 3 \(ImageID '2.jpg'\)"):
        dataset.check_images(decode=True, workers=workers)
    (folder / "3.jpg").unlink()
    with pytest.raises(ImageLoadError, match=r"3 image\(s\) unreadable \(1 missing, 2 cannot be decoded\)"):
        dataset.check_images(decode=True, workers=workers)


def test_train_val_split():
    frame = pd.DataFrame({"ImageID": [f"{i}.jpg" for i in range(100)], "Caption": [""] * 100})
    train, val = train_val_split(frame, 0.2, seed=1)
    again_train, again_val = train_val_split(frame, 0.2, seed=1)
    assert train.equals(again_train) and val.equals(again_val)
    assert len(train) == 80 and len(val) == 20
    assert train.index.equals(pd.RangeIndex(80)) and val.index.equals(pd.RangeIndex(20))
    assert set(train["ImageID"]).isdisjoint(val["ImageID"]) and len(set(train["ImageID"]) | set(val["ImageID"])) == 100
    assert list(val["ImageID"]) == sorted(val["ImageID"], key=lambda s: int(s[:-4]))  # file order kept
    assert not val.equals(train_val_split(frame, 0.2, seed=2)[1])
    train, val = train_val_split(frame, 0.0, seed=1)
    assert len(val) == 0 and list(val.columns) == ["ImageID", "Caption"] and train.equals(frame)
    assert len(train_val_split(frame, 0.001)[1]) == 1
    with pytest.raises(ValueError):
        train_val_split(frame, 1.0)


@pytest.mark.comp5329
def test_real_dataset(comp5329_dir):
    frame = read_annotations(comp5329_dir / "train.csv")
    codec = LabelCodec.from_labels(frame["Labels"])
    transform = build_transform("tf_efficientnet_lite0", 64, training=True)
    tokenizer = train_caption_tokenizer(frame["Caption"])
    dataset = ImageCaptionDataset(frame, comp5329_dir / "data", codec, tokenizer, transform)
    assert dataset.check_images() == []
    batch = Collator()([dataset[i] for i in (0, 1014, 2259, 6751)])
    assert batch["image"].shape == (4, 3, 64, 64) and batch["targets"].shape == (4, 18)
    assert batch["image_id"] == ["0.jpg", "1014.jpg", "2259.jpg", "6751.jpg"]
    assert batch["label_seq"][:, 0].tolist() == [codec.index(1), codec.index(18), codec.index(1), codec.index(4)]


def test_errors_name_the_row_of_the_annotation_file_after_a_split(folder, parts):
    frame, codec, tokenizer, transform = parts
    frame = frame.assign(_row=range(len(frame)))
    (folder / "2.jpg").unlink()
    _, val = train_val_split(frame, 0.5, seed=3)
    position = val.index[val["ImageID"] == "2.jpg"]
    if len(position) == 0:
        val, _ = train_val_split(frame, 0.5, seed=3)
        position = val.index[val["ImageID"] == "2.jpg"]
    dataset = ImageCaptionDataset(val, folder, codec, tokenizer, transform)
    with pytest.raises(ImageLoadError) as info:
        dataset[int(position[0])]
    assert "data row 3 (ImageID '2.jpg')" in str(info.value)  # its row of the whole file, counted from 1
    with pytest.raises(ImageLoadError, match=r"data row 3 \(ImageID '2.jpg'\)"):
        dataset.check_images()


def test_subsample_rows_shrinks_the_training_part_reproducibly():
    frame = pd.DataFrame({"ImageID": [f"{i}.jpg" for i in range(50)], "_row": range(50)})
    part = subsample_rows(frame, 0.4, seed=1)
    assert len(part) == 20 and part["_row"].is_monotonic_increasing  # file order kept
    assert part.equals(subsample_rows(frame, 0.4, seed=1)) and not part.equals(subsample_rows(frame, 0.4, seed=2))
    assert set(subsample_rows(frame, 0.2, seed=1)["_row"]) != set(part["_row"][:10])  # a draw, not a prefix rule
    assert subsample_rows(frame, 1.0) is frame and len(subsample_rows(frame, 0.001)) == 1
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="training fraction"):
            subsample_rows(frame, bad)


def test_batches_from_the_image_cache_are_read_in_one_copy_and_equal_sample_by_sample(folder, parts, tmp_path):
    """The DataLoader's batched fetch (`__getitems__`) from the uint8 cache gives the batch that per-sample fetching
    gives, with the images stacked once; an image the cache could not read sends the batch down the per-sample path,
    which reports it (or, with skip_bad_images, blanks it) as before."""
    from multimodal.data import SampleBatch, build_image_cache

    frame, codec, tokenizer, _ = parts
    (folder / "2.jpg").write_bytes(b"not a jpeg")
    cache = build_image_cache(list(frame["ImageID"]), folder, tmp_path / "cache", SIZE, skip_bad_images=True)
    collate = Collator()
    dataset = ImageCaptionDataset(frame, folder, codec, tokenizer, image_cache=cache)

    fetched = dataset.__getitems__([3, 0, 1])
    assert isinstance(fetched, SampleBatch) and fetched.images.shape == (3, SIZE, SIZE, 3)
    assert all(s["image"].data_ptr() == fetched.images[k].data_ptr() for k, s in enumerate(fetched))  # views
    one_by_one = collate([dataset[i] for i in (3, 0, 1)])
    batched = collate(fetched)
    assert batched["image"] is fetched.images and batched.keys() == one_by_one.keys()
    for key, value in one_by_one.items():
        if torch.is_tensor(value):
            assert torch.equal(batched[key], value), key
        else:
            assert batched[key] == value, key

    with pytest.raises(ImageLoadError, match="2.jpg"):  # the unreadable image, named as by the per-sample path
        dataset.__getitems__([0, 2])
    lenient = ImageCaptionDataset(frame, folder, codec, tokenizer, image_cache=cache, skip_bad_images=True)
    mixed = lenient.__getitems__([0, 2])
    assert not isinstance(mixed, SampleBatch) and [s["image_ok"] for s in mixed] == [True, False]

    # a DataLoader with workers takes the batched path and gives the same batches
    loader = DataLoader(dataset, batch_size=2, sampler=[3, 0, 1], collate_fn=collate, num_workers=1)
    first = next(iter(loader))
    assert torch.equal(first["image"], one_by_one["image"][:2]) and first["image_id"] == ["3.jpg", "0.jpg"]

    with_transform = ImageCaptionDataset(frame, folder, codec, tokenizer, image_cache=cache,
                                         transform=lambda image: image.float())
    assert not isinstance(with_transform.__getitems__([0, 1]), SampleBatch)  # a per-sample transform: per sample
    dataset.transform = lambda image: image.float()  # set after construction (benchmarks/throughput.py does)
    assert not isinstance(dataset.__getitems__([0, 1]), SampleBatch)
    assert dataset.__getitems__([0, 1])[0]["image"].dtype == torch.float32


# ------------------------------------------------------------------------------------- image files decoded on device

def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth image with a few edges (resampling filters disagree most on noise, which photos are not)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([120 + 100 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], -1)
    for _ in range(4):  # flat rectangles: sharp edges
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[top: top + height // 4, left: left + width // 3] = rng.integers(0, 256, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("squash", [False, True], ids=["short-side-and-aligned-square", "whole-image-squashed"])
def test_device_decoder_gives_the_image_cache_squares(tmp_path, squash):
    """`EncodedImageDecoder` (torchvision's JPEG decoder and torch's antialiased resize, here on the CPU) gives what
    the image cache holds for each image (Pillow decode and resize) up to resampling rounding: the same square, the
    same alignment of the crop, for landscape, portrait and small images; PNG and CMYK JPEG go through Pillow."""
    from multimodal.images import EncodedImageDecoder, load_image, resize_for_cache

    shapes = [(150, 200), (210, 140), (40, 50), (97, 131)]
    files = []
    for i, (h, w) in enumerate(shapes):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(photo_like(h, w, i)).save(path, quality=95)
        files.append(path)
    png, cmyk = tmp_path / "p.png", tmp_path / "c.jpg"
    Image.fromarray(photo_like(120, 90, 7)).save(png)
    Image.fromarray(photo_like(100, 130, 8)).convert("CMYK").save(cmyk, quality=95)
    files += [png, cmyk]
    size, crop = 64, None if squash else 56
    decoder = EncodedImageDecoder(size, "bicubic", crop=crop, squash=squash)
    images, errors = decoder([p.read_bytes() for p in files] + [None])
    assert images.shape == (len(files) + 1, size, size, 3) and images.dtype == torch.uint8
    assert errors == [None] * (len(files) + 1) and images[-1].eq(0).all()  # None (no file): zeros, no error
    for path, got in zip(files, images):
        expected = torch.from_numpy(np.array(resize_for_cache(load_image(path), size, "bicubic", crop, squash)))
        difference = (got.int() - expected.int()).abs().float()
        assert difference.mean() < 1.0, (path.name, difference.mean())
        # a misplaced square (one pixel off) or a swapped channel would differ by far more than rounding
        assert (difference > 16).float().mean() < 0.01, path.name
    for_model = EncodedImageDecoder.for_model("tf_efficientnet_lite0", 224, "full" if squash else "center")
    assert (for_model.size, for_model.squash) == ((224, True) if squash else (256, False))


def test_device_decoding_in_batches_names_bad_files_with_their_rows(folder, parts):
    """The loader only reads the files (a missing one is reported there, with its row); `decode_images` decodes the
    batch and names an undecodable file with its row and ImageID, or with skip_bad_images zeros and flags it and
    leaves the rest of the batch as it would be without it."""
    from multimodal.data import decode_images
    from multimodal.images import EncodedImageDecoder

    frame, codec, tokenizer, _ = parts
    decoder = EncodedImageDecoder(SIZE, "bicubic")
    dataset = ImageCaptionDataset(frame, folder, codec, tokenizer, encoded_images=True)
    sample = dataset[1]
    assert "image" not in sample and sample["image_file"] == (folder / "1.jpg").read_bytes()
    assert sample["image_source"] == (str(folder / "1.jpg"), 1)
    good = decode_images(Collator()([dataset[i] for i in range(4)]), decoder)
    assert good["image"].shape == (4, SIZE, SIZE, 3) and good["all_images_ok"] and good["image_ok"].all()
    assert "image_files" not in good and good["targets"].shape == (4, codec.num_labels)
    with pytest.raises(ValueError, match="image cache"):
        ImageCaptionDataset(frame, folder, encoded_images=True, image_cache=object())

    (folder / "2.jpg").write_bytes((folder / "2.jpg").read_bytes()[:300])  # truncated
    batch = Collator()([dataset[i] for i in range(4)])
    with pytest.raises(ImageLoadError) as info:
        decode_images(batch, decoder)
    assert str(info.value).startswith(f"{folder / '2.jpg'}: data row 3 (ImageID '2.jpg'): cannot decode image")
    lenient = decode_images(batch, decoder, skip_bad_images=True)
    assert lenient["image_ok"].tolist() == [True, True, False, True] and not lenient["all_images_ok"]
    assert "data row 3" in lenient["error"][2] and lenient["image"][2].eq(0).all()
    assert torch.equal(lenient["image"][[0, 1, 3]], good["image"][[0, 1, 3]])

    (folder / "0.jpg").unlink()
    with pytest.raises(ImageLoadError, match=r"0\.jpg: data row 1 \(ImageID '0.jpg'\): file not found"):
        dataset[0]
    skipping = ImageCaptionDataset(frame, folder, codec, tokenizer, skip_bad_images=True, encoded_images=True)
    batch = decode_images(Collator()([skipping[i] for i in range(4)]), decoder, skip_bad_images=True)
    assert batch["image_ok"].tolist() == [False, True, False, True] and "file not found" in batch["error"][0]
    # through Accelerate's device placement, the files and their sources stay on the host as they are
    moved = send_to_device(Collator()([skipping[i] for i in (1, 3)]), torch.device("cpu"))
    assert moved["image_files"][0] == (folder / "1.jpg").read_bytes()


def test_device_decoded_real_images_match_the_image_cache(comp5329_dir):
    """On COMP5329 photos, the device decoder's squares (here decoded on the CPU) differ from the image cache's by a
    fraction of a grey level."""
    from multimodal.images import EncodedImageDecoder, image_cache_settings, load_image, resize_for_cache

    paths = [comp5329_dir / "data" / f"{i}.jpg" for i in (0, 1014, 2259, 6751, 9000, 12345)]
    for crop in ("center", "full"):
        settings = image_cache_settings("tf_efficientnet_lite0", 288, crop)
        images, errors = EncodedImageDecoder(**settings)([p.read_bytes() for p in paths])
        assert errors == [None] * len(paths)
        for path, got in zip(paths, images):
            expected = torch.from_numpy(np.array(resize_for_cache(load_image(path), **settings)))
            assert (got.int() - expected.int()).abs().float().mean() < 0.5, (crop, path.name)

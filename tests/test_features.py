"""Cached image features: the encoder split is exact, and the cache is invalidated by whatever it depends on."""
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from multimodal.data import ImageCaptionDataset
from multimodal.features import FeatureDataset, cached_features
from multimodal.model import ImageEncoder


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ImageEncoder("tf_efficientnet_lite0").eval()


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    ids = []
    for i in range(5):
        Image.new("RGB", (40, 30), (40 * i, 255 - 30 * i, 90)).save(folder / f"{i}.jpg")
        ids.append(f"{i}.jpg")
    return pd.DataFrame({"ImageID": ids, "Caption": [""] * len(ids)}), folder


@pytest.mark.parametrize("tail", [0, 1, 2])
def test_stem_then_tail_equals_the_whole_encoder(encoder, tail):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = encoder(x)
        split = encoder.forward_tail(encoder.forward_stem(x, tail), tail)
    torch.testing.assert_close(split, whole)


def test_freeze_below_tail_leaves_only_the_tail_trainable():
    enc = ImageEncoder("tf_efficientnet_lite0")
    enc.freeze_below_tail(1)
    trainable = {n.split(".")[1] + ("." + n.split(".")[2] if n.split(".")[1] == "blocks" else "")
                 for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.6", "conv_head", "bn2"}


def test_cache_is_reused_and_invalidated(encoder, images, tmp_path):
    frame, folder = images
    cache = tmp_path / "cache"
    rng = torch.get_rng_state()
    feats, ok = cached_features(encoder, frame, folder, 32, cache, workers=0)
    assert torch.equal(torch.get_rng_state(), rng)  # building it leaves training's random stream alone
    assert feats.shape == (5, encoder.num_features) and ok.all()
    assert len(list(cache.iterdir())) == 1
    again, _ = cached_features(encoder, frame, folder, 32, cache, workers=0)
    torch.testing.assert_close(again, feats)
    assert len(list(cache.iterdir())) == 1  # a hit: nothing new written

    cached_features(encoder, frame, folder, 48, cache, workers=0)  # resolution
    assert len(list(cache.iterdir())) == 2
    maps, _ = cached_features(encoder, frame, folder, 32, cache, workers=0, tail_stages=1)  # split point
    assert maps.ndim == 4 and maps.dtype == torch.float16 and len(list(cache.iterdir())) == 3
    full, _ = cached_features(encoder, frame, folder, 32, cache, workers=0, crop="full")  # preprocessing
    assert len(list(cache.iterdir())) == 4 and full.shape == feats.shape  # (solid images: same values)
    copy = shutil.copytree(folder, tmp_path / "copy")  # the same bytes elsewhere, with new file times: a hit
    for path in copy.iterdir():
        os.utime(path, ns=(10**18, 10**18))
    torch.testing.assert_close(cached_features(encoder, frame, copy, 32, cache, workers=0)[0], feats)
    assert len(list(cache.iterdir())) == 4
    stat = (folder / "3.jpg").stat()
    Image.new("RGB", (40, 30), (0, 0, 0)).save(folder / "3.jpg")  # an image changed, its file time put back
    os.utime(folder / "3.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed, _ = cached_features(encoder, frame, folder, 32, cache, workers=0)
    assert len(list(cache.iterdir())) == 5
    assert not torch.allclose(changed[3], feats[3]) and torch.allclose(changed[0], feats[0])
    other = ImageEncoder("tf_efficientnet_lite0").eval()  # other weights
    cached_features(other, frame, folder, 32, cache, workers=0)
    assert len(list(cache.iterdir())) == 6


def test_maps_are_keyed_by_the_weights_below_the_tail_only(images, tmp_path):
    """Feature maps depend on the stages below the trained tail, not on the tail: a resumed run, whose tail has
    trained, finds the maps its start computed; other weights below the tail do not."""
    frame, folder = images
    torch.manual_seed(1)
    enc = ImageEncoder("tf_efficientnet_lite0").eval()
    cache = tmp_path / "cache"
    maps, _ = cached_features(enc, frame, folder, 32, cache, workers=0, tail_stages=1)
    with torch.no_grad():
        enc.backbone.conv_head.weight.add_(1.0)  # the tail trained
    torch.testing.assert_close(cached_features(enc, frame, folder, 32, cache, workers=0, tail_stages=1)[0], maps)
    assert len(list(cache.iterdir())) == 1
    with torch.no_grad():
        enc.backbone.blocks[0][0].conv_dw.weight.add_(1.0)  # below the tail: other maps
    cached_features(enc, frame, folder, 32, cache, workers=0, tail_stages=1)
    assert len(list(cache.iterdir())) == 2
    pooled, _ = cached_features(enc, frame, folder, 32, cache, workers=0)
    with torch.no_grad():
        enc.backbone.conv_head.weight.add_(1.0)  # pooled features depend on the whole encoder
    assert not torch.allclose(cached_features(enc, frame, folder, 32, cache, workers=0)[0], pooled)


def test_a_cache_that_skipped_bad_images_is_not_read_without_skipping(encoder, images, tmp_path):
    """Features cached by a --skip-bad-images run mark the unreadable images; a run without the flag stops on them,
    naming the file and its row, as it would on the image itself (it trained without them, and said so only at the
    end)."""
    from multimodal.images import ImageLoadError
    frame, folder = images
    (folder / "3.jpg").write_bytes(b"not a jpeg")
    frame = frame.assign(_row=range(len(frame)))
    _, ok = cached_features(encoder, frame, folder, 32, tmp_path / "cache", workers=0, skip_bad_images=True)
    assert ok.tolist() == [True, True, True, False, True]
    with pytest.raises(ImageLoadError, match=r"3.jpg: data row 4 \(ImageID '3.jpg'\): unreadable when the feature "
                                             r"cache .* was built \(1 image\(s\) in all"):
        cached_features(encoder, frame, folder, 32, tmp_path / "cache", workers=0)
    assert cached_features(encoder, frame, folder, 32, tmp_path / "cache", workers=0,
                           skip_bad_images=True)[1].tolist() == ok.tolist()


def test_the_cache_is_written_under_this_process_own_temporary_name(encoder, images, tmp_path, monkeypatch):
    """Two runs computing the same features at once each publish their own complete file (they shared one
    temporary name, and the second failed after computing everything); stale temporary files are removed."""
    import multimodal.config as config_module  # `config.published` flushes, then renames, what the cache wrote
    frame, folder = images
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / "features-x.safetensors.1-aa.partial.tmp"
    stale.write_bytes(b"left by a killed run")
    os.utime(stale, (0, 0))
    fsync, started = config_module.fsync, []

    def another_run_publishes_first(path):  # between this run's write of its file and its rename into place
        if not started:
            started.append(True)
            cached_features(encoder, frame, folder, 32, cache, workers=0)
        return fsync(path)
    monkeypatch.setattr(config_module, "fsync", another_run_publishes_first)
    feats, ok = cached_features(encoder, frame, folder, 32, cache, workers=0)
    assert ok.all() and [p.suffix for p in cache.iterdir()] == [".safetensors"] and not stale.exists()
    torch.testing.assert_close(cached_features(encoder, frame, folder, 32, cache, workers=0)[0], feats)


def test_feature_dataset_serves_rows_and_flips_maps(images):
    frame, _ = images
    maps = torch.arange(5 * 2 * 3 * 4, dtype=torch.float16).view(5, 2, 3, 4)
    ok = torch.tensor([True, True, False, True, True])
    ds = FeatureDataset(ImageCaptionDataset(frame), maps, ok, rows=[4, 2, 0, 1, 3], flip=True)
    torch.manual_seed(0)
    seen = [ds[0]["image_features"] for _ in range(20)]
    assert any(torch.equal(s, maps[4]) for s in seen) and any(torch.equal(s, maps[4].flip(-1)) for s in seen)
    assert ds[1]["image_ok"] is False and ds[0]["image_ok"] is True
    plain = FeatureDataset(ImageCaptionDataset(frame), maps, ok, rows=range(5))
    assert all(torch.equal(plain[i]["image_features"], maps[i]) for i in range(5))


def test_freshly_computed_maps_train_the_tail(images, tmp_path):
    """The first run (cache miss) trains on the tensors just computed: they must be usable by autograd."""
    from multimodal.config import ModelConfig
    from multimodal.data import Collator
    from multimodal.model import MultimodalClassifier
    frame, folder = images
    model = MultimodalClassifier(ModelConfig(num_labels=3, image_encoder="tf_efficientnet_lite0", image_size=32,
                                             use_decoder=False))
    maps, ok = cached_features(model.image_encoder, frame, folder, 32, tmp_path / "cache", workers=0, tail_stages=1)
    model.image_encoder.freeze_below_tail(1)
    model.tail_stages = 1
    batch = Collator()([FeatureDataset(ImageCaptionDataset(frame), maps, ok, range(5), flip=True)[i] for i in range(5)])
    model.train()
    model(image_features=batch["image_features"])["fused_logits"].sum().backward()
    assert model.image_encoder.backbone.conv_head.weight.grad is not None
    assert model.image_encoder.backbone.conv_stem.weight.grad is None


def test_the_cache_is_keyed_by_how_images_are_decoded_and_by_the_libraries(encoder, images, tmp_path,
                                                                          monkeypatch):
    """A change of the decoding code (`images.DECODE_VERSION`, bumped with it) or of a library that decodes the
    images or runs the encoder gives new features: the cache built before is not read (it used to be, after the
    fixes to transparency and floating-point images)."""
    import timm

    from multimodal import images as images_module
    from multimodal.data import image_cache_fingerprint
    frame, folder = images
    cache = tmp_path / "cache"
    cached_features(encoder, frame, folder, 32, cache, workers=0)
    image_key = image_cache_fingerprint(frame["ImageID"], folder, 40, "bicubic")
    monkeypatch.setattr(images_module, "DECODE_VERSION", images_module.DECODE_VERSION + 1)
    cached_features(encoder, frame, folder, 32, cache, workers=0)
    assert len(list(cache.iterdir())) == 2
    assert image_cache_fingerprint(frame["ImageID"], folder, 40, "bicubic") != image_key  # the uint8 cache too
    monkeypatch.setattr(timm, "__version__", "0.0.1")
    cached_features(encoder, frame, folder, 32, cache, workers=0)
    assert len(list(cache.iterdir())) == 3


@pytest.mark.parametrize("damage", ["truncated", "other rows"])
def test_a_damaged_cache_file_is_computed_again(encoder, images, tmp_path, caplog, damage):
    """A cache file cut short (an interrupted copy) stopped the run with a safetensors error; one that holds other
    rows than its name promises was used as it was. Both are computed again, with a warning, and replaced."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    frame, folder = images
    cache = tmp_path / "cache"
    feats, _ = cached_features(encoder, frame, folder, 32, cache, workers=0)
    [path] = cache.iterdir()
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()  # its own fingerprint, kept: only the rows are wrong
        save_file({k: v[:3] for k, v in tensors.items()}, str(path), metadata=metadata)
    with caplog.at_level("WARNING", logger="multimodal"):
        again, ok = cached_features(encoder, frame, folder, 32, cache, workers=0)
    assert f"the cache {path} is" in caplog.text and "computing the features again" in caplog.text
    assert ("it has 3 rows, not 5" in caplog.text) == (damage == "other rows")
    torch.testing.assert_close(again, feats)
    assert ok.all() and [p.name for p in cache.iterdir()] == [path.name]
    torch.testing.assert_close(load_file(str(path))["features"], feats)  # replaced by a whole file


def test_an_image_unreadable_when_the_cache_was_built_is_tried_again(encoder, images, tmp_path, monkeypatch):
    """An image that failed for a reason outside its bytes (a network drive's passing error) was cached as unreadable
    for good: the file is the same, so is the cache's key. It is tried again on every later read; when it reads, its
    features are computed and the cache is updated."""
    from multimodal import data as data_module
    from multimodal.images import ImageLoadError
    frame, folder = images
    frame = frame.assign(_row=range(len(frame)))
    reference, _ = cached_features(encoder, frame, folder, 32, tmp_path / "reference", workers=0)
    real_load = data_module.load_image

    def flaky(path, *args, **kwargs):
        if Path(path).name == "3.jpg":
            raise ImageLoadError(path, "input/output error")
        return real_load(path, *args, **kwargs)
    monkeypatch.setattr(data_module, "load_image", flaky)
    cache = tmp_path / "cache"
    _, ok = cached_features(encoder, frame, folder, 32, cache, workers=0, skip_bad_images=True)
    assert ok.tolist() == [True, True, True, False, True]
    monkeypatch.undo()
    # the other processes of a launch take the cache as the main one left it
    assert not cached_features(encoder, frame, folder, 32, cache, workers=0, skip_bad_images=True,
                               retry_unreadable=False)[1][3]
    feats, ok = cached_features(encoder, frame, folder, 32, cache, workers=0)  # without skipping: no error now
    assert ok.all()
    torch.testing.assert_close(feats, reference)
    assert len(list(cache.iterdir())) == 1
    torch.testing.assert_close(cached_features(encoder, frame, folder, 32, cache, workers=0)[0], reference)
    (folder / "3.jpg").write_bytes(b"damaged")  # unreadable in its bytes: a new key, skipped and reported as before
    cached_features(encoder, frame, folder, 32, cache, workers=0, skip_bad_images=True)
    with pytest.raises(ImageLoadError, match=r"3.jpg: data row 4 .*still unreadable"):
        cached_features(encoder, frame, folder, 32, cache, workers=0)


def test_computing_the_features_leaves_the_callers_encoder_as_it_was(images, tmp_path):
    """The features are computed on a copy of the encoder: the caller's stays in its mode and memory layout (it was
    turned channels-last, so a --no-channels-last run trained its tail channels-last on the process that computed the
    features, and contiguous on the others: a DDP stride mismatch)."""
    frame, folder = images
    enc = ImageEncoder("tf_efficientnet_lite0").train()
    cached_features(enc, frame, folder, 32, tmp_path / "cache", workers=0, tail_stages=1)
    weight = enc.backbone.conv_stem.weight  # 3 x 3: its two layouts differ
    assert enc.training and weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)

"""The throughput benchmark (smoke mode) and the speed options it measures: the uint8 image cache, batched
on-device preprocessing, draft decoding in prediction. Ratios and fields only: never absolute timings."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from multimodal.data import Collator, ImageCaptionDataset, build_image_cache
from multimodal.images import (BatchImageTransform, ImageLoadError, build_transform, draft_size_for, eval_resize_size,
                               image_cache_settings, resolve_image_config)

ROOT = Path(__file__).resolve().parent.parent
ENCODER = "efficientnet_b0"


@pytest.fixture()
def jpegs(tmp_path) -> tuple[Path, list[str]]:
    """JPEGs of several shapes (portrait, landscape, odd sizes) so crop offsets round both ways."""
    rng = np.random.default_rng(0)
    names = []
    for i, (h, w) in enumerate([(40, 53), (53, 40), (47, 61), (61, 47), (45, 45), (39, 70)]):
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)  # smooth-ish content
        image = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        names.append(f"{i}.jpg")
        image.save(tmp_path / names[-1], quality=90)
    return tmp_path, names


@pytest.mark.parametrize("crop", ["center", "full"])
@pytest.mark.parametrize("size", [32, 28, 24])
def test_cache_reproduces_the_eval_transform(jpegs, tmp_path, size, crop):
    image_dir, names = jpegs
    cache = build_image_cache(names, image_dir, tmp_path / "cache", **image_cache_settings(ENCODER, size, crop))
    assert cache.meta["squash"] is (crop == "full")
    frame = pd.DataFrame({"ImageID": names, "Caption": [""] * len(names)})
    transform = build_transform(ENCODER, size, False, crop=crop)
    reference = torch.stack([ImageCaptionDataset(frame, image_dir, transform=transform)[i]["image"]
                             for i in range(len(names))])
    cached = ImageCaptionDataset(frame, image_dir, image_cache=cache)
    batch = next(iter(DataLoader(cached, batch_size=len(names), collate_fn=Collator())))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (len(names), cache.size, cache.size, 3)
    out = BatchImageTransform(ENCODER, size, training=False)(batch["image"])
    assert out.shape == reference.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_cache_is_reused_and_invalidated(jpegs, tmp_path):
    image_dir, names = jpegs
    rng = torch.get_rng_state()
    first = build_image_cache(names, image_dir, tmp_path / "cache", 36)
    assert torch.equal(torch.get_rng_state(), rng)  # building it leaves training's random stream alone
    assert first.meta["reused"] is False and first.meta["build_seconds"] >= 0 and len(first) == len(names)
    assert build_image_cache(names, image_dir, tmp_path / "cache", 36).meta["reused"] is True
    os.utime(image_dir / names[0], ns=(1, 1))  # a new file time, the same bytes (a copied dataset): reused
    assert build_image_cache(names, image_dir, tmp_path / "cache", 36).meta["reused"] is True
    Image.new("RGB", (50, 50), (1, 2, 3)).save(image_dir / names[0])
    os.utime(image_dir / names[0], ns=(1, 1))  # changed bytes under the old file time: new fingerprint
    rebuilt = build_image_cache(names, image_dir, tmp_path / "cache", 36)
    assert rebuilt.meta["reused"] is False and rebuilt.path != first.path
    assert rebuilt.image(names[0]).float().mean(-1).sub(2).abs().max() < 3


def test_two_builds_of_one_cache_at_once_both_succeed_and_publish_it_whole(jpegs, tmp_path, monkeypatch):
    """Two runs building the same cache at the same time (a sweep over seeds) each write their own temporary file:
    they shared one, and the second zeroed what the first had written, then failed after its whole build. A stale
    temporary file (a build killed a day ago) is removed; a fresh one (a build at work) is left alone."""
    import multimodal.data as data_module
    image_dir, names = jpegs
    reference = build_image_cache(names, image_dir, tmp_path / "reference", 36)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    stale, busy = cache_dir / "x.npy.1-aa.partial.npy", cache_dir / "y.npy.2-bb.partial.npy"
    stale.write_bytes(b"left by a killed build")
    os.utime(stale, (0, 0))
    legacy = cache_dir / "images-36-bicubic-0123.tmp.npy"  # the name every build shared before
    legacy.write_bytes(b"left by a killed build of an older version")
    os.utime(legacy, (0, 0))
    busy.write_bytes(b"another build at work")
    load_image, inner, started = data_module.load_image, [], []

    def load_and_start_another_build(path, *args, **kwargs):
        if not started and Path(path).name == names[2]:  # the first build is part-way: the second one runs whole
            started.append(True)
            inner.append(build_image_cache(names, image_dir, cache_dir, 36))
        return load_image(path, *args, **kwargs)
    monkeypatch.setattr(data_module, "load_image", load_and_start_another_build)
    outer = build_image_cache(names, image_dir, cache_dir, 36)
    assert inner and inner[0].path == outer.path and inner[0].meta["reused"] is False
    assert np.array_equal(np.asarray(outer.array), np.asarray(reference.array))  # no row zeroed
    assert not stale.exists() and not legacy.exists() and busy.exists()
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([outer.path.name, outer.path.stem + ".json",
                                                                  busy.name])


def test_cache_bad_images(jpegs, tmp_path):
    image_dir, names = jpegs
    (image_dir / "bad.jpg").write_bytes(b"not a jpeg")
    last = len(names) + 1  # the data row of bad.jpg, counted from 1
    with pytest.raises(ImageLoadError, match=rf"bad.jpg: data row {last} \(ImageID 'bad.jpg'\): cannot decode"):
        build_image_cache(names + ["bad.jpg"], image_dir, tmp_path / "cache", 36)
    cache = build_image_cache(names + ["bad.jpg"], image_dir, tmp_path / "cache", 36, skip_bad_images=True)
    assert list(cache.ok) == [True] * len(names) + [False]
    frame = pd.DataFrame({"ImageID": ["bad.jpg", names[0]], "Caption": ["", ""]})
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        ImageCaptionDataset(frame, image_dir, image_cache=cache)[0]
    lenient = ImageCaptionDataset(frame, image_dir, image_cache=cache, skip_bad_images=True)
    sample = lenient[0]
    assert sample["image_ok"] is False and sample["image"].shape == (36, 36, 3) and not sample["image"].any()


@pytest.mark.parametrize("damage", ["array cut short", "sidecar cut short", "sidecar with too few flags"])
def test_a_damaged_image_cache_is_built_again(jpegs, tmp_path, caplog, damage):
    """A cache file cut short (an interrupted copy) or a damaged sidecar stopped the run with numpy's or json's error
    (or an IndexError later, in training). It is built again, with a warning naming the file."""
    image_dir, names = jpegs
    reference = build_image_cache(names, image_dir, tmp_path / "reference", 36)
    first = build_image_cache(names, image_dir, tmp_path / "cache", 36)
    sidecar = first.path.with_suffix(".json")
    if damage == "array cut short":
        first.path.write_bytes(first.path.read_bytes()[:-500])
    elif damage == "sidecar cut short":
        sidecar.write_text(sidecar.read_text()[:40])
    else:
        sidecar.write_text(json.dumps(json.loads(sidecar.read_text()) | {"ok": [True]}))
    with caplog.at_level("WARNING", logger="multimodal"):
        cache = build_image_cache(names, image_dir, tmp_path / "cache", 36)
    assert f"{cache.path} " in caplog.text and "building it again" in caplog.text
    assert cache.meta["reused"] is False and cache.ok.all()
    assert np.array_equal(np.asarray(cache.array), np.asarray(reference.array))
    assert build_image_cache(names, image_dir, tmp_path / "cache", 36).meta["reused"] is True


def test_an_image_unreadable_when_the_image_cache_was_built_is_added_when_it_reads(jpegs, tmp_path, monkeypatch):
    """An image that failed for a reason outside its bytes (a network drive's passing error: the same bytes, the same
    key) stayed unreadable in the cache for good. A later build that reuses the cache tries it again and writes it
    into its row in place; the other rows are untouched, and the other processes of a launch take the cache as is."""
    from multimodal import data as data_module
    image_dir, names = jpegs
    reference = build_image_cache(names, image_dir, tmp_path / "reference", 36)
    real_load = data_module.load_image

    def flaky(path, *args, **kwargs):
        if Path(path).name == names[2]:
            raise ImageLoadError(path, "input/output error")
        return real_load(path, *args, **kwargs)
    monkeypatch.setattr(data_module, "load_image", flaky)
    first = build_image_cache(names, image_dir, tmp_path / "cache", 36, skip_bad_images=True)
    assert list(first.ok) == [True, True, False, True, True, True] and not np.asarray(first.array[2]).any()
    assert list(build_image_cache(names, image_dir, tmp_path / "cache", 36).ok) == list(first.ok)  # still failing
    monkeypatch.undo()
    assert not build_image_cache(names, image_dir, tmp_path / "cache", 36, retry_unreadable=False).ok[2]
    cache = build_image_cache(names, image_dir, tmp_path / "cache", 36)
    assert cache.ok.all() and cache.meta["reused"] is True and cache.path == first.path and not cache.errors
    assert np.array_equal(np.asarray(cache.array), np.asarray(reference.array))
    again = build_image_cache(names, image_dir, tmp_path / "cache", 36)
    assert again.ok.all() and np.array_equal(np.asarray(again.array), np.asarray(reference.array))


def test_batch_transform_training():
    images = torch.randint(0, 256, (6, 36, 36, 3), dtype=torch.uint8)
    identity = BatchImageTransform(ENCODER, 36, training=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                                   color_jitter=0.0)(images)
    evaluation = BatchImageTransform(ENCODER, 36, training=False)(images)
    torch.testing.assert_close(identity, evaluation, atol=1e-4, rtol=0)  # full crop, no flip: the image itself
    flipped = BatchImageTransform(ENCODER, 36, training=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0,
                                  color_jitter=0.0)(images)
    torch.testing.assert_close(flipped, evaluation.flip(-1), atol=1e-4, rtol=0)
    augment = BatchImageTransform(ENCODER, 32, training=True)
    torch.manual_seed(0)
    a, b = augment(images), augment(images)
    assert a.shape == (6, 3, 32, 32) and torch.isfinite(a).all() and not torch.equal(a, b)
    # A generator makes the draws reproducible and leaves the global RNG alone.
    state = torch.get_rng_state()
    c = augment(images, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(augment(images, generator=torch.Generator().manual_seed(7)), c, atol=0, rtol=0)
    assert not torch.equal(augment(images, generator=torch.Generator().manual_seed(8)), c)


def test_draft_size_for():
    config = resolve_image_config(ENCODER, 224)
    assert draft_size_for(ENCODER, 224) == eval_resize_size(config) == 256
    assert draft_size_for(ENCODER, 224, training=True) == 224


def run_smoke(script: str, output: Path, *args: str, **env: str) -> dict:
    """``benchmarks/SCRIPT --smoke ARGS --output OUTPUT`` in a subprocess, which must succeed: its JSON results."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *args, "--output",
                           str(output)], cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(output.read_text())


def test_throughput_smoke(tmp_path):
    results = run_smoke("throughput.py", tmp_path / "smoke.json", "--sections",
                        "train,infer,loader,options,draft,memory,checkpoint", OMP_WAIT_POLICY="PASSIVE",
                        TQDM_DISABLE="1")
    machine = results["machine"]
    for key in ("cpu_model", "cpu_count", "torch", "loadavg_start", "device"):
        assert key in machine
    per = results["sizes"]["32"]
    train, infer = per["train"], per["infer"]
    for name in ("encoder_alone", "image_branch_only", "joint_plain_loop", "joint_train_one_epoch"):
        assert train["bare"][name]["images_per_s"] > 0 and train["bare"][name]["images"] > 0
        assert len(train["bare"][name]["loadavg_before"]) == 3
    for name in ("encoder_alone", "e2e_jpeg", "e2e_cache", "e2e_device_decode"):
        assert train["end_to_end"][name]["images_per_s"] > 0
        assert all(len(r["loadavg_before"]) == 3 for r in train["end_to_end"][name]["rounds"])
    for name in ("encoder_alone", "joint_predict_proba"):
        assert infer["bare"][name]["images_per_s"] > 0
    for name in ("joint_predict_proba", "predict_to_csv_jpeg", "predict_to_csv_cache", "predict_to_csv_device_decode"):
        assert infer["end_to_end"][name]["images_per_s"] > 0
    ratios = {**train["ratios"], **infer["ratios"]}
    for key in ("joint_train_one_epoch/encoder_alone", "e2e_jpeg/encoder_alone", "e2e_cache/encoder_alone",
                "predict_to_csv_jpeg/joint_predict_proba", "predict_to_csv_cache/joint_predict_proba"):
        assert math.isfinite(ratios[key]) and ratios[key] > 0
    assert per["loader"]["eval_jpeg_workers0"]["per_worker_images_per_s"] > 0
    assert per["loader"]["files_only_workers0"]["images_per_s"] > 0
    assert per["loader"]["decode_resize_on_cpu"]["images_per_s"] > 0
    for key in ("e2e_device_decode/encoder_alone", "predict_to_csv_device_decode/joint_predict_proba"):
        assert math.isfinite(ratios[key]) and ratios[key] > 0
    assert per["image_cache"]["build_seconds"] >= 0 and per["image_cache"]["images"] > 0
    options = per["options"]
    for key in ("draft", "channels_last_train", "channels_last_forward"):
        assert key in options
    for key, pair in (("caption_lstm_train", ("packed", "padded")), ("fused_adamw_train", ("loop", "fused")),
                      ("caption_lstm_encoder_alone", ("packed", "padded"))):
        assert all(len(options[key][name]["step_seconds"]) > 0 for name in pair)
        assert options[key][f"ratio_{pair[1]}/{pair[0]}"] > 0
        assert options[key][f"ratio_{pair[1]}/{pair[0]} (median of per-batch ratios)"] > 0
    assert train["ratios"]["joint_plain_loop/encoder_alone (median of per-batch ratios)"] > 0
    assert options["draft"]["32"]["ratio_draft/no_draft"] > 0
    memory = results["memory"]
    assert memory["predict_8"]["returncode"] == 0 and memory["predict_16"]["returncode"] == 0
    assert memory["predict_16"]["peak_tree_rss_mib"] > 0
    assert "ratio_peak_tree_rss_many/few" in memory
    assert results["summary"]["32"]["train_ratios"] == train["ratios"]
    checkpoint = results["checkpoint"]  # a checkpoint's cost: every variant timed, each file of it listed
    assert {"model.safetensors", "optimizer.safetensors", "manifest.json", "progress.json"} <= set(checkpoint["files"])
    assert checkpoint["bytes"] == sum(checkpoint["files"].values()) and checkpoint["train_step_seconds"] > 0
    for name in ("manager", "raw", "accelerate", "check", "load"):
        assert len(checkpoint["seconds"][name]) == 1 and checkpoint["in_train_steps"][name] > 0
    assert all(v > 0 for v in checkpoint["ratios"].values())


@pytest.mark.parametrize("crop", ["center", "full"])
def test_predict_from_cache_matches_jpegs(jpegs, tmp_path, crop):
    from accelerate import Accelerator

    from multimodal.config import ModelConfig
    from multimodal.inference import predict_to_csv
    from multimodal.labels import LabelCodec
    from multimodal.model import MultimodalClassifier
    from multimodal.text import train_caption_tokenizer

    image_dir, names = jpegs
    frame = pd.DataFrame({"ImageID": names, "Caption": ["a dog", "two cats", "", "a car", "dog and car", "x"]})
    codec = LabelCodec.from_labels([(1,), (2,), (3,)])
    tokenizer = train_caption_tokenizer(frame["Caption"])
    torch.manual_seed(0)
    # Real (offline) ImageNet weights: a randomly initialised EfficientNet's pooled features are about 1e-6, so the
    # probabilities would hardly depend on the pixels and the comparisons below would prove nothing.
    encoder = "tf_efficientnet_lite0"
    model = MultimodalClassifier(ModelConfig(num_labels=3, image_encoder=encoder, image_size=32, image_crop=crop,
                                             vocab_size=tokenizer.get_vocab_size()), pretrained=True).eval()
    model.codec, model.tokenizer = codec, tokenizer
    with torch.no_grad():  # logits of order 1 from the image features
        model.fused_head.weight.normal_(0.0, 0.2)
    cache = build_image_cache(names, image_dir, tmp_path / "cache", **image_cache_settings(encoder, 32, crop))
    outputs = {}
    for name, kwargs in (("jpeg", {}), ("cache", {"image_cache": cache}), ("nodraft", {"draft_size": None})):
        result = predict_to_csv(model, frame, image_dir, tmp_path / f"{name}.csv", Accelerator(cpu=True),
                                probabilities=tmp_path / f"{name}.prob.csv", batch_size=4, workers=0, **kwargs)
        assert result["rows"] == len(names)
        outputs[name] = pd.read_csv(tmp_path / f"{name}.prob.csv")
    for name in ("cache", "nodraft"):
        assert list(outputs[name]["ImageID"]) == names
        np.testing.assert_allclose(outputs[name].iloc[:, 1:].to_numpy(), outputs["jpeg"].iloc[:, 1:].to_numpy(),
                                   atol=2e-6)
    # The model's crop mode is what prediction applies: the same weights with the other mode predict otherwise.
    import dataclasses
    other = MultimodalClassifier(dataclasses.replace(model.config, image_crop={"center": "full"}.get(crop, "center")))
    other.load_state_dict(model.state_dict())
    other.codec, other.tokenizer = codec, tokenizer
    predict_to_csv(other.eval(), frame, image_dir, tmp_path / "other.csv", Accelerator(cpu=True),
                   probabilities=tmp_path / "other.prob.csv", batch_size=4, workers=0)
    difference = np.abs(pd.read_csv(tmp_path / "other.prob.csv").iloc[:, 1:].to_numpy()
                        - outputs["jpeg"].iloc[:, 1:].to_numpy())
    assert difference.max() > 0.05


def test_an_ensemble_over_one_frozen_bottom_decodes_and_runs_it_once(jpegs, tmp_path, monkeypatch):
    """Members fine-tuned above the same frozen bottom of one pretrained encoder (the CPU recipe's two seeds):
    `predict_to_csv` reads each image once for both and runs the bottom once per batch, each member only its top,
    and the probabilities are the mean of the members' own."""
    from accelerate import Accelerator

    from multimodal.config import ModelConfig
    from multimodal.data import ImageCaptionDataset
    from multimodal.inference import predict_to_csv, shared_stem_stages
    from multimodal.labels import LabelCodec
    from multimodal.model import ImageEncoder, MultimodalClassifier
    from multimodal.text import train_caption_tokenizer

    image_dir, names = jpegs
    frame = pd.DataFrame({"ImageID": names, "Caption": ["a dog", "two cats", "", "a car", "dog and car", "x"]})
    codec = LabelCodec.from_labels([(1,), (2,), (3,)])
    tokenizer = train_caption_tokenizer(frame["Caption"])
    torch.manual_seed(0)
    config = ModelConfig(num_labels=3, image_encoder="tf_efficientnet_lite0", image_size=32,
                         vocab_size=tokenizer.get_vocab_size())
    first = MultimodalClassifier(config, pretrained=True)
    members = [first]
    for _ in range(2):
        other = MultimodalClassifier(config)
        other.load_state_dict(first.state_dict())
        members.append(other)
    for seed, model in enumerate(members):  # the heads, and the last stage and head convolution of the encoder
        g = torch.Generator().manual_seed(seed)
        backbone = model.image_encoder.backbone
        with torch.no_grad():
            model.fused_head.weight.normal_(0.0, 0.2, generator=g)
            for param in (*backbone.blocks[-1].parameters(), backbone.conv_head.weight):
                param.mul_(1 + 0.5 * torch.randn(param.shape, generator=g))
        model.codec, model.tokenizer = codec, tokenizer
    a, b, c = members
    assert shared_stem_stages([a.image_encoder, b.image_encoder, c.image_encoder]) == 1
    assert shared_stem_stages([a.image_encoder, a.image_encoder]) == 0
    with torch.no_grad():
        c.image_encoder.backbone.blocks[2][0].conv_pw.weight.mul_(1.01)
    assert shared_stem_stages([a.image_encoder, c.image_encoder]) == 5  # blocks[2:] of 7 differ
    with torch.no_grad():
        c.image_encoder.backbone.conv_stem.weight.mul_(1.01)
    assert shared_stem_stages([a.image_encoder, c.image_encoder]) is None

    calls = {"forward": 0, "forward_stem": 0, "item": 0}

    def counted(cls, name):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            calls[{"__getitem__": "item"}.get(name, name)] += 1
            return original(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, wrapper)

    counted(ImageEncoder, "forward")
    counted(ImageEncoder, "forward_stem")
    counted(ImageCaptionDataset, "__getitem__")

    def probabilities(models, name, **kwargs):
        for key in calls:
            calls[key] = 0
        predict_to_csv(models, frame, image_dir, tmp_path / f"{name}.csv", Accelerator(cpu=True), batch_size=4,
                       workers=0, probabilities=tmp_path / f"{name}.prob.csv", **kwargs)
        return pd.read_csv(tmp_path / f"{name}.prob.csv").iloc[:, 1:].to_numpy(), dict(calls)

    alone = [probabilities(m, f"alone{i}")[0] for i, m in enumerate((a, b))]
    assert np.abs(alone[0] - alone[1]).max() > 0.01  # the members differ
    shared, shared_calls = probabilities([a, b], "shared")
    apart, apart_calls = probabilities([a, b], "apart", share=False)
    np.testing.assert_allclose(shared, (alone[0] + alone[1]) / 2, atol=2e-6)
    np.testing.assert_allclose(apart, shared, atol=2e-6)
    assert shared_calls == {"forward": 0, "forward_stem": 2, "item": len(names)}  # 2 batches, each image once
    assert apart_calls == {"forward": 4, "forward_stem": 0, "item": 2 * len(names)}
    # An ensemble member with another preprocessing reads its own batches beside the shared ones.
    import dataclasses
    larger = MultimodalClassifier(dataclasses.replace(config, image_size=40))
    larger.load_state_dict(b.state_dict())
    larger.codec, larger.tokenizer = codec, tokenizer
    three, three_calls = probabilities([a, larger, b], "three")
    np.testing.assert_allclose(three, (alone[0] + alone[1] + probabilities(larger, "larger")[0]) / 3, atol=2e-6)
    assert three_calls == {"forward": 2, "forward_stem": 2, "item": 2 * len(names)}
    # Two streams ran interleaved: the caller gets its gradient mode back as it was.
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_median_paired_ratio_resists_one_slowed_step():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import median_paired_ratio, ratio
    fast = {"images_per_s": 4 * 32 / 4.0, "step_seconds": [1.0, 1.0, 1.0, 1.0]}
    slow = {"images_per_s": 4 * 32 / 8.0, "step_seconds": [1.25, 1.25, 1.25, 4.25]}  # one step hit by another job
    assert ratio(slow, fast) == 0.5
    assert median_paired_ratio(slow, fast) == 0.8
    assert math.isnan(median_paired_ratio({"images_per_s": 1.0}, fast))


def test_recipe_step_smoke(tmp_path):
    results = run_smoke("recipe_step.py", tmp_path / "recipe.json", OMP_WAIT_POLICY="PASSIVE")
    for variant in ("packed+loop", "padded+loop", "packed+fused", "padded+fused"):
        assert results[variant]["images_per_s"] > 0 and len(results[variant]["step_seconds"]) == 2
    assert len(results["map_shape"]) == 3  # the cached map below the trained tail: [C, h, w]
    for variant in ("padded+loop", "packed+fused", "padded+fused"):
        assert results["ratios"][f"{variant}/packed+loop"] > 0


def test_ensemble_predict_smoke(tmp_path):
    results = run_smoke("ensemble_predict.py", tmp_path / "ensemble.json")
    assert results["shared_stem_stages"] == 1  # the smoke members differ in their last stage only
    assert results["agreement"] == {"max_abs_probability_difference": pytest.approx(0.0, abs=2e-6),
                                    "same_labels": True}
    for name in ("one_model", "ensemble_shared", "ensemble_apart"):
        assert results["end_to_end"][name]["images"] == results["rows"] == 24
    assert all(v > 0 for v in results["ratios"].values())


def test_verify_images_smoke(tmp_path):
    results = run_smoke("verify_images.py", tmp_path / "verify.json")
    for name in ("verify_1_thread", "verify_2_threads", "exists_only", "loader_epoch"):
        assert results["measured"][name]["images"] == results["rows"] == 40
    assert all(v > 0 for v in results["ratios"].values())


def test_device_waits_counts_synchronizing_calls_by_line_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """throughput.py's report of where a step makes the host wait for the GPU (CUDA's sync debug mode warnings),
    with CUDA's calls stubbed here; it runs after the timed measurements, so a failure is recorded, not raised."""
    import warnings

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput

    modes: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step() -> None:
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation")  # the same line twice
        warnings.warn("an unrelated warning")

    found = throughput.device_waits(step)
    assert found["count"] == 2 and list(found["where"].values()) == [2]
    assert next(iter(found["where"])).startswith("test_benchmarks.py:")
    assert modes == ["warn", "default"]  # the debug mode is switched back off

    def broken() -> None:
        raise RuntimeError("no GPU")

    assert throughput.device_waits(broken) == {"error": "RuntimeError: no GPU"}
    assert modes[-1] == "default"

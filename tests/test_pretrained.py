"""Weight resolution: local files, offline lite packages (renamed by position), a quick clear failure offline."""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from multimodal import pretrained
from multimodal.pretrained import (
    OFFLINE_PACKAGES,
    PretrainedWeightsError,
    available_offline_weights,
    load_pretrained_image_weights,
    rename_by_position,
)

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COCO_CAT = "17"


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network and an empty Hugging Face cache, so that every test sees the same sources."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


def needs_offline(name: str):
    return pytest.mark.skipif(name not in available_offline_weights(), reason=f"{OFFLINE_PACKAGES[name]} missing")


def package_state_dict(name: str) -> dict[str, torch.Tensor]:
    with pretrained._offline_weight_file(name).open("rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", [pytest.param(name, marks=needs_offline(name)) for name in OFFLINE_PACKAGES])
def test_offline_package_loads_strictly_by_position(name: str) -> None:
    model = timm.create_model(name, num_classes=0)
    source = load_pretrained_image_weights(model, name, True)
    assert OFFLINE_PACKAGES[name] in source
    package = package_state_dict(name)
    torch.testing.assert_close(model.conv_stem.weight, package["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.bn2.running_var, package["_bn1.running_var"], rtol=0, atol=0)
    # The lite weights expect (x - 0.5) / 0.5 at 224/240/260 px: timm's config for these models says so.
    config = resolve_data_config(model=model)
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)
    assert config["interpolation"] == "bicubic"


def test_rename_by_position_reports_the_first_shape_mismatch() -> None:
    source = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    target = {"x.weight": torch.ones(2, 3), "y.weight": torch.ones(5)}
    with pytest.raises(PretrainedWeightsError, match=r"#1 is b.weight \(4,\).*y.weight \(5,\)"):
        rename_by_position(source, target)
    with pytest.raises(PretrainedWeightsError, match="2 tensors in the file, 1 in the model"):
        rename_by_position(source, {"x.weight": torch.ones(2, 3)})


def test_rename_by_position_ignores_one_sided_num_batches_tracked() -> None:
    source = {"bn.weight": torch.full((3,), 2.0), "bn.num_batches_tracked": torch.tensor(7)}
    target = {"n.weight": torch.ones(3)}
    assert rename_by_position(source, target).keys() == {"n.weight"}
    target["n.num_batches_tracked"] = torch.tensor(0)
    renamed = rename_by_position({"bn.weight": torch.full((3,), 2.0)}, target)
    assert renamed["n.weight"].eq(2).all() and renamed["n.num_batches_tracked"] == 0


@needs_offline("tf_efficientnet_lite1")
def test_wrong_variant_raises_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "lite1.pth"
    torch.save(package_state_dict("tf_efficientnet_lite1"), path)
    with pytest.raises(PretrainedWeightsError, match="do not fit the model by position"):
        load_pretrained_image_weights(timm.create_model("tf_efficientnet_lite0", num_classes=0), "x", str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_file_roundtrip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    trained = timm.create_model("test_efficientnet", num_classes=7)  # with a classifier, which must be dropped
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(trained.state_dict(), str(path))
    else:  # a training checkpoint: wrapped and saved from a DataParallel/DDP model
        torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}, "epoch": 3}, path)
    model = timm.create_model("test_efficientnet", num_classes=0)
    assert load_pretrained_image_weights(model, "test_efficientnet", str(path)) == f"file {path}"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained.state_dict()[key], rtol=0, atol=0)


def test_missing_file_raises(tmp_path: Path) -> None:
    model = timm.create_model("test_efficientnet", num_classes=0)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        load_pretrained_image_weights(model, "test_efficientnet", str(tmp_path / "w.pth"))


def test_offline_without_weights_fails_fast_and_says_what_to_do(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="multimodal.pretrained")
    model = timm.create_model("efficientnet_lite0", num_classes=0)  # not tf_: the lite packages do not fit it
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as error:
        load_pretrained_image_weights(model, "efficientnet_lite0", True)
    assert time.perf_counter() - start < 3
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message and "--pretrained-file" in message and "--no-pretrained" in message
    assert "multimodal[weights]" in message
    assert sum("Skipping the Hugging Face hub" in r.getMessage() for r in caplog.records) == 1


def test_unreachable_hub_is_probed_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # discard port: refused at once
    for proxy in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError, match="cannot connect to 127.0.0.1:9"):
        load_pretrained_image_weights(timm.create_model("test_efficientnet", num_classes=0), "test_efficientnet", True)
    assert time.perf_counter() - start < 4


def test_hub_cache_is_used_offline() -> None:
    torch.manual_seed(1)
    cached = timm.create_model("test_efficientnet", num_classes=1000)
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--timm--test_efficientnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    safetensors.torch.save_file(cached.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    model = timm.create_model("test_efficientnet", num_classes=0)
    assert "hub cache" in load_pretrained_image_weights(model, "test_efficientnet", True)
    torch.testing.assert_close(model.conv_stem.weight, cached.conv_stem.weight, rtol=0, atol=0)


def test_reachable_hub_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    from_hub = timm.create_model("test_efficientnet", num_classes=0)
    model = timm.create_model("test_efficientnet", num_classes=0)
    monkeypatch.setattr(pretrained, "_hub_offline_reason", lambda: None)
    monkeypatch.setattr(pretrained.timm, "create_model", lambda name, pretrained, num_classes: from_hub)
    assert "Hugging Face hub" in load_pretrained_image_weights(model, "test_efficientnet", True)
    torch.testing.assert_close(model.conv_stem.weight, from_hub.conv_stem.weight, rtol=0, atol=0)


def first_cat_photo(comp5329_dir: Path) -> Path:
    """The first training image (file order) labelled only 'cat' whose caption says 'cat': 46.jpg."""
    with open(comp5329_dir / "train.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            words = "".join(c if c.isalpha() else " " for c in row["Caption"] or "").lower().split()
            if row["Labels"] and row["Labels"].split() == [COCO_CAT] and "cat" in words:
                return comp5329_dir / "data" / row["ImageID"]
    raise AssertionError("no cat photo in train.csv")


def sees_a_cat(model: torch.nn.Module, image: Image.Image) -> bool:
    """Top-1 and so top-5 class is an ImageNet cat (top-1 too, as a random net's fixed top-5 can hold one by luck)."""
    transform = create_transform(**resolve_data_config(model=model))
    with torch.no_grad():
        top5 = model.eval()(transform(image).unsqueeze(0))[0].topk(5).indices.tolist()
    return top5[0] in IMAGENET_CATS and any(c in IMAGENET_CATS for c in top5)


@pytest.mark.comp5329
@needs_offline("tf_efficientnet_lite0")
def test_lite0_weights_recognise_a_coco_cat(comp5329_dir: Path) -> None:
    image = Image.open(first_cat_photo(comp5329_dir)).convert("RGB")
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    load_pretrained_image_weights(model, "tf_efficientnet_lite0", True)
    assert sees_a_cat(model, image)
    for seed in range(2):  # the control: the same check fails without the weights
        torch.manual_seed(seed)
        assert not sees_a_cat(timm.create_model("tf_efficientnet_lite0", num_classes=1000), image)

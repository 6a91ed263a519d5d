"""Multi-label image classification from the image and its caption.

    from multimodal import MultimodalClassifier
    model = MultimodalClassifier.from_pretrained("runs/latest/model")
    model.predict(["photo.jpg"], ["A man riding a horse on a beach."])

The names below are imported on first use, so that importing a submodule (as the scripts' ``--help`` does) does not
load torch.
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("multimodal")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

_EXPORTS = {
    "MultimodalClassifier": "model", "ModelConfig": "config", "LossConfig": "config", "JointLoss": "losses",
    "LabelCodec": "labels", "ImageCaptionDataset": "data", "Collator": "data", "predict_to_csv": "inference",
    "read_annotations": "annotations", "train_caption_tokenizer": "text", "load_image": "images",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

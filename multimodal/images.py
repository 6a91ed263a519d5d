"""Image loading and the timm preprocessing that matches the image encoder's weights."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

__all__ = ["ImageLoadError", "load_image", "build_transform", "resolve_image_config"]

# Errors Pillow raises for unreadable files: OSError (truncated, undecodable; UnidentifiedImageError is one),
# SyntaxError/ValueError/struct.error/EOFError from some format plugins, DecompressionBombError for huge images.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as viewers show them


class ImageLoadError(ValueError, OSError):
    """An image file that is missing or cannot be decoded; the message names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __str__(self) -> str:  # OSError would format (errno, strerror) from two arguments
        return str(self.args[0])


def load_image(path: str | Path, draft_size: Optional[int] = None) -> Image.Image:
    """Open, fully decode and convert an image to 8-bit RGB.

    Decoding happens here (``img.load()``) so a truncated or corrupt file fails now, with its name, rather than later
    inside a transform. Truncated files are errors: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone.

    Args:
        path: image file.
        draft_size: if given, let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while keeping both sides at least
            ``draft_size`` pixels (``Image.draft``). Much faster when the model input is far smaller than the file;
            other formats ignore it.

    Returns:
        An ``RGB`` image. Transparency (RGBA, LA, palette with transparency) is composited on white; 16-bit images
        are scaled to 8 bits; CMYK and the other modes go through Pillow's conversion.

    Raises:
        ImageLoadError: the file is missing or cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            if draft_size is not None:
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return _to_rgb(img)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except _DECODE_ERRORS as err:
        raise ImageLoadError(path, f"cannot decode image ({type(err).__name__}: {err})") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # 16/32-bit integer grey: Pillow's conversion would clip everything above 255
        array = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = array / 257.0
        return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resolve_image_config(encoder: Union[str, torch.nn.Module], image_size: Optional[int] = None) -> dict[str, Any]:
    """Preprocessing config (input size, interpolation, mean, std, crop) of a timm model or model name.

    A module that is not itself a timm model (e.g. a wrapper) is searched for a submodule carrying ``pretrained_cfg``.
    A name is resolved from timm's registry of pretrained configs without building the model.
    """
    args = {"input_size": (3, image_size, image_size)} if image_size is not None else {}
    if isinstance(encoder, str):
        pretrained_cfg = timm.get_pretrained_cfg(encoder)
        if pretrained_cfg is None:  # not in the registry: build it to read its default config
            return resolve_data_config(args, model=timm.create_model(encoder, pretrained=False))
        return resolve_data_config(args, pretrained_cfg=pretrained_cfg.to_dict())
    model = next((m for m in encoder.modules() if getattr(m, "pretrained_cfg", None)), encoder)
    return resolve_data_config(args, model=model)


def build_transform(
    encoder_name_or_model: Union[str, torch.nn.Module], image_size: int, training: bool, **kwargs: Any
) -> Callable[[Image.Image], torch.Tensor]:
    """timm preprocessing for an image encoder at a given resolution.

    Mean, std, interpolation and crop percentage follow the encoder's pretrained config, so they always match the
    weights. Training uses timm's standard augmentation (random resized crop, horizontal flip, colour jitter; no
    auto-augment unless asked for); evaluation resizes and centre-crops per the config's ``crop_pct``.

    Args:
        encoder_name_or_model: a timm model name (e.g. ``"tf_efficientnet_lite0"``) or a model.
        image_size: output height and width.
        training: augmenting training transform or deterministic evaluation transform.
        **kwargs: passed to ``timm.data.create_transform``, e.g. ``scale=(0.5, 1.0)`` or
            ``auto_augment="rand-m9-mstd0.5"``.

    Returns:
        A callable mapping an RGB PIL image to a float tensor [3, image_size, image_size].
    """
    config = resolve_image_config(encoder_name_or_model, image_size)
    return create_transform(**config, is_training=training, **kwargs)

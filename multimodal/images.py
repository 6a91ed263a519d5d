"""Image loading and the timm preprocessing that matches the image encoder's weights."""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from .config import IMAGE_CROPS

__all__ = ["ImageLoadError", "load_image", "build_transform", "resolve_image_config", "eval_resize_size",
           "draft_size_for", "resize_for_cache", "image_cache_settings", "BatchImageTransform", "EncodedImageDecoder"]

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
        An ``RGB`` image, upright by its EXIF orientation. Transparency (RGBA, LA, palette with transparency) is
        composited on white; 16-bit images are scaled to 8 bits; CMYK and the other modes go through Pillow's
        conversion.

    Raises:
        ImageLoadError: the file is missing or cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            if draft_size is not None and min(img.size) >= 2 * draft_size:  # else no 1/2^k reduction is possible
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except _DECODE_ERRORS as err:
        raise ImageLoadError(path, _decode_reason(err)) from err


def is_readable(path: str | Path) -> bool:
    """Whether `load_image` reads the file now (caches use it to try again images that failed when they were built)."""
    try:
        load_image(path)
    except ImageLoadError:
        return False
    return True


def _decode_reason(err: BaseException) -> str:
    return f"cannot decode image ({type(err).__name__}: {err})"


def _bytes_orientation(data: bytes) -> int:
    """`exif_orientation` of an image file's bytes, as Pillow reads it when it loads the file (EXIF, XMP, a PNG's
    text chunk): one source of truth for every loader and the caches' keys. Only the header is parsed (tens of
    microseconds, however large the file)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return exif_orientation(img)
    except _DECODE_ERRORS:
        return 1


def _pillow_rgb(data: bytes) -> tuple[Optional[np.ndarray], Optional[str]]:
    """An image file's bytes decoded as `load_image` decodes the file: uint8 [H, W, 3], or None and the reason."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.array(to_rgb(img)), None
    except _DECODE_ERRORS as err:
        return None, _decode_reason(err)


EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a camera held the picture (1: upright; 2 to 8: turned or mirrored)


# The transposition that turns an image of each orientation upright (as `PIL.ImageOps.exif_transpose`).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


_ORIENTATION_SOURCES = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif")  # where Pillow reads it


def exif_orientation(img: Image.Image) -> int:
    """The image's EXIF orientation, as Pillow reads it (1 where it has none, or an unreadable one)."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels stay as stored
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """An image in 8-bit RGB, converted as `load_image` converts files: turned upright by its EXIF orientation (a
    phone's portrait photo is stored sideways with a tag that says so), transparency on white (an alpha channel, or
    the one transparent colour of a palette, grey or RGB PNG), 16-bit scaled, floating-point 0..1 scaled."""
    orientation = exif_orientation(img)
    if orientation != 1:
        img = img.transpose(_UPRIGHT[orientation])  # the pixels only: a damaged EXIF block is never rewritten
        for key in _ORIENTATION_SOURCES:  # upright now: converting it again must not turn it again
            img.info.pop(key, None)
    transparent = "transparency" in img.info and img.mode in ("P", "L", "RGB")
    if img.mode == "RGB" and not transparent:
        return img
    if img.mode.startswith("I") or img.mode == "F":  # Pillow's conversion would clip everything above 255
        array = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            if array.max(initial=0) <= 1.0:  # a floating-point image in 0..1
                array = array * 255.0
        elif img.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = array / 257.0
        return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or transparent:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resolve_image_config(encoder: Union[str, torch.nn.Module], image_size: Optional[int] = None,
                         crop: str = "center") -> dict[str, Any]:
    """Preprocessing config (input size, interpolation, mean, std, crop) of a timm model or model name.

    A module that is not itself a timm model (e.g. a wrapper) is searched for a submodule carrying ``pretrained_cfg``.
    A name is resolved from timm's registry of pretrained configs without building the model. ``crop`` is one of
    `config.IMAGE_CROPS`: ``"full"`` sets ``crop_pct=1`` and ``crop_mode="squash"`` (whole image resized to the input
    size).
    """
    if crop not in IMAGE_CROPS:
        raise ValueError(f"crop must be one of {IMAGE_CROPS}, got {crop!r}")
    args = {"input_size": (3, image_size, image_size)} if image_size is not None else {}
    if isinstance(encoder, str):
        pretrained_cfg = timm.get_pretrained_cfg(encoder)
        if pretrained_cfg is None:  # not in the registry: build it to read its default config
            config = resolve_data_config(args, model=timm.create_model(encoder, pretrained=False))
        else:
            config = resolve_data_config(args, pretrained_cfg=pretrained_cfg.to_dict())
    else:
        model = next((m for m in encoder.modules() if getattr(m, "pretrained_cfg", None)), encoder)
        config = resolve_data_config(args, model=model)
    if crop == "full":
        config.update(crop_pct=1.0, crop_mode="squash")
    return config


def build_transform(
    encoder_name_or_model: Union[str, torch.nn.Module], image_size: int, training: bool, crop: str = "center",
    **kwargs: Any
) -> Callable[[Image.Image], torch.Tensor]:
    """timm preprocessing for an image encoder at a given resolution.

    Mean, std, interpolation and crop percentage follow the encoder's pretrained config, so they always match the
    weights. Training uses timm's standard augmentation (random resized crop, horizontal flip, colour jitter; no
    auto-augment unless asked for); evaluation resizes and centre-crops per the config's ``crop_pct``, or with
    ``crop="full"`` resizes the whole image to ``image_size`` x ``image_size``.

    Args:
        encoder_name_or_model: a timm model name (e.g. ``"tf_efficientnet_lite0"``) or a model.
        image_size: output height and width.
        training: augmenting training transform or deterministic evaluation transform.
        crop: one of `config.IMAGE_CROPS` (evaluation only; training always takes random resized crops).
        **kwargs: passed to ``timm.data.create_transform``, e.g. ``scale=(0.5, 1.0)`` or
            ``auto_augment="rand-m9-mstd0.5"``.

    Returns:
        A callable mapping an RGB PIL image to a float tensor [3, image_size, image_size].
    """
    config = resolve_image_config(encoder_name_or_model, image_size, crop)
    return create_transform(**config, is_training=training, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Speed options: reduced-size JPEG decoding, the uint8 image cache's resize, and batched on-device preprocessing.


def eval_resize_size(config: dict[str, Any]) -> int:
    """The short side timm's evaluation transform resizes to before its centre crop (``floor(size / crop_pct)``);
    with ``crop_mode="squash"`` both sides are resized to it."""
    return int(math.floor(config["input_size"][-1] / config["crop_pct"]))


def image_cache_settings(encoder_name_or_model: Union[str, torch.nn.Module], image_size: int,
                         crop: str = "center") -> dict[str, Any]:
    """Keyword arguments of `multimodal.data.build_image_cache` (``size``, ``interpolation``, ``crop``, ``squash``)
    for which the cache reproduces the evaluation transform of this encoder, resolution and crop mode exactly."""
    config = resolve_image_config(encoder_name_or_model, image_size, crop)
    return {"size": eval_resize_size(config), "interpolation": config["interpolation"], "crop": int(image_size),
            "squash": config.get("crop_mode") == "squash"}


def draft_size_for(encoder_name_or_model: Union[str, torch.nn.Module], image_size: int, training: bool = False,
                   crop: str = "center") -> int:
    """The ``draft_size`` for `load_image` that loses nothing the transform keeps.

    Evaluation resizes the short side to `eval_resize_size` and then crops, so a JPEG may be decoded at 1/2, 1/4 or
    1/8 scale as long as its short side stays at least that large: the bicubic resize that follows is still a
    reduction. Training crops a random part of the image (``RandomResizedCrop``), so the draft keeps the short side
    at least ``image_size`` (a full-image crop keeps its detail; small crops are enlarged either way). With
    ``crop="full"`` both sides are resized to ``image_size``, which the draft keeps as its minimum side.
    """
    if training:
        return int(image_size)
    return eval_resize_size(resolve_image_config(encoder_name_or_model, image_size, crop))


def resize_for_cache(image: Image.Image, size: int, interpolation: str = "bicubic",
                     crop: Optional[int] = None, squash: bool = False) -> np.ndarray:
    """Short side resized to ``size``, then a ``size`` x ``size`` square cut out: uint8 [size, size, 3]. With
    ``squash`` the whole image is resized to ``size`` x ``size`` instead (timm's ``crop_mode="squash"``).

    The resize is torchvision's ``Resize`` on the PIL image, as in timm's evaluation transform. The square is the
    centre one; with ``crop`` it is shifted (by at most half a pixel) so that the centre ``crop`` x ``crop`` of the
    square is exactly the centre crop that timm's evaluation transform takes of the resized image, whose offset is
    rounded per image. Built with ``size = eval_resize_size(...)`` and ``crop = image_size``, the cache then
    reproduces the evaluation transform bit for bit.
    """
    from timm.data.transforms import str_to_interp_mode
    from torchvision.transforms import functional as TF

    if squash:  # no alignment needed: the square is the whole resized image, as in the evaluation transform
        return np.asarray(TF.resize(image, [size, size], interpolation=str_to_interp_mode(interpolation)),
                          dtype=np.uint8)
    image = TF.resize(image, size, interpolation=str_to_interp_mode(interpolation))
    W, H = image.size
    top, left = _square_offset(H, W, size, crop)
    return np.asarray(TF.crop(image, top, left, size, size), dtype=np.uint8)


def _short_side_size(H: int, W: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to ``size``, rounded as torchvision's ``Resize``."""
    return (size, int(size * W / H)) if H <= W else (int(size * H / W), size)


def _square_offset(H: int, W: int, size: int, crop: Optional[int]) -> tuple[int, int]:
    """(top, left) of the ``size`` x ``size`` square that `resize_for_cache` keeps of an H x W resized image."""
    top, left = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
    if crop is not None:  # the crop's offset in the resized image minus its offset in the square
        inner = int(round((size - crop) / 2.0))
        top = min(max(int(round((H - crop) / 2.0)) - inner, 0), H - size)
        left = min(max(int(round((W - crop) / 2.0)) - inner, 0), W - size)
    return top, left


class EncodedImageDecoder:
    """Decodes a batch of image files (their bytes) where the model runs, and resizes each to the uint8 square that
    the image cache would hold for it: [B, S, S, 3] on ``device``, for `BatchImageTransform`.

    JPEGs are decoded by ``torchvision.io.decode_jpeg``, batched: on a GPU by nvJPEG, so that the CPU cores only read
    files; on a CPU by libjpeg-turbo (the same pixels as Pillow). Each image is then resized on the device as
    `resize_for_cache` resizes it (short side to ``size`` then the aligned square, or the whole image squashed), with
    torch's antialiased interpolation instead of Pillow's: the pixels differ slightly (a test bounds the mean
    difference below half a grey level on COMP5329 photos; benchmarks/SPEED.md, section 5, for the predictions).
    Files that are not JPEGs, or that the device decoder refuses (e.g. CMYK), are decoded by Pillow as `load_image`
    decodes them; a file that neither can decode gets an error message instead of an image.

    Args:
        size, interpolation, crop, squash: as `resize_for_cache` (`image_cache_settings` gives them for a model).
        device: where to decode and resize.
    """

    def __init__(self, size: int, interpolation: str = "bicubic", crop: Optional[int] = None, squash: bool = False,
                 device: Union[str, torch.device] = "cpu") -> None:
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"device decoding resizes bilinearly or bicubically, not with {interpolation!r}")
        self.size, self.interpolation, self.crop, self.squash = int(size), interpolation, crop, squash
        self.device = torch.device(device)

    @classmethod
    def for_model(cls, encoder_name_or_model: Union[str, torch.nn.Module], image_size: int, crop: str = "center",
                  device: Union[str, torch.device] = "cpu") -> "EncodedImageDecoder":
        """The decoder whose squares are those of the image cache of this encoder, resolution and crop mode."""
        return cls(**image_cache_settings(encoder_name_or_model, image_size, crop), device=device)

    def __call__(self, files: Sequence[Optional[bytes]]) -> tuple[torch.Tensor, list[Optional[str]]]:
        """``files``: each image file's bytes, or None for a row without one (it stays zeros).

        Returns:
            uint8 [B, S, S, 3] on the device, and per file None or the reason it could not be decoded (its square
            is zeros).
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        S = self.size
        out = torch.zeros(len(files), S, S, 3, dtype=torch.uint8, device=self.device)
        errors: list[Optional[str]] = [None] * len(files)
        # JPEGs to the device decoder, except those with an EXIF orientation: Pillow turns them upright, as
        # `load_image` does (torchvision can too, but not every version on every device)
        jpegs = [i for i, data in enumerate(files) if data is not None and data[:3] == b"\xff\xd8\xff"
                 and _bytes_orientation(data) == 1]
        decoded: dict[int, torch.Tensor] = {}
        if jpegs:
            inputs = [torch.frombuffer(bytearray(files[i]), dtype=torch.uint8) for i in jpegs]
            if self.device.type == "cuda":
                # torchvision's nvJPEG decoder allocates its outputs on the caller's stream but writes them from its
                # own stream without waiting for the caller's: a block freed while queued kernels still read it could
                # be overwritten under them (pytorch/vision#9606). Nothing may be pending when it allocates.
                torch.cuda.current_stream(self.device).synchronize()
            try:
                decoded = dict(zip(jpegs, decode_jpeg(inputs, mode=ImageReadMode.RGB, device=self.device)))
            except RuntimeError:  # one bad file fails the batch: decode one by one to find it
                for i, data in zip(jpegs, inputs):
                    with contextlib.suppress(RuntimeError):
                        decoded[i] = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        for i, data in enumerate(files):
            if data is not None and i not in decoded:  # not a JPEG, or refused by the device decoder: Pillow
                array, errors[i] = _pillow_rgb(data)
                if array is not None:
                    decoded[i] = torch.from_numpy(array).permute(2, 0, 1).to(self.device)
        by_shape: dict[tuple[int, int], list[int]] = {}  # photos come in few sizes: one resize per size
        for i, image in decoded.items():
            by_shape.setdefault((image.shape[-2], image.shape[-1]), []).append(i)
        for rows in by_shape.values():
            out[rows] = self._resize(torch.stack([decoded[i] for i in rows])).permute(0, 2, 3, 1)
        return out, errors

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> uint8 [N, 3, S, S], as `resize_for_cache`."""
        S = self.size
        H, W = images.shape[-2:]
        height, width = (S, S) if self.squash else _short_side_size(H, W, S)
        x = torch.nn.functional.interpolate(images.float(), size=(height, width), mode=self.interpolation,
                                            antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        if self.squash:
            return x
        top, left = _square_offset(height, width, S, self.crop)
        return x[:, :, top: top + S, left: left + S]


class BatchImageTransform(torch.nn.Module):
    """timm-style preprocessing of a whole uint8 batch [B, H, W, 3] on its device (GPU or CPU) -> float [B, 3, s, s].

    For images from the uint8 cache (`multimodal.data.ImageCache`): the loader only copies bytes, and the resize,
    augmentation and normalisation run batched where the model runs. Evaluation is a centre crop of ``image_size``
    then timm's mean/std, which matches the PIL evaluation transform when the cache was built at
    `eval_resize_size`. Training draws, per image, timm's ``RandomResizedCrop`` box (same scale and ratio ranges,
    10 tries then the whole image), a horizontal flip and colour jitter (brightness, contrast, saturation by factors
    in ``[1 - color_jitter, 1 + color_jitter]``, in that fixed order), and resamples bilinearly (``grid_sample``).
    Differences from the PIL training transform: crops come from the cached centre square, resampling is bilinear
    without antialiasing, and the jitter order is fixed.

    The output keeps the channels-last layout of the input (``permute`` of [B, H, W, 3]) unless ``channels_last`` is
    False. A single image [H, W, 3] gives [3, s, s]: on a CPU the transform belongs in the DataLoader workers, not
    in the process that runs the model.
    """

    def __init__(self, encoder_name_or_model: Union[str, torch.nn.Module], image_size: int, training: bool,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, color_jitter: float = 0.4, channels_last: bool = True) -> None:
        super().__init__()
        config = resolve_image_config(encoder_name_or_model, image_size)
        self.image_size = int(image_size)
        self.training_mode = training
        self.scale, self.ratio, self.hflip, self.color_jitter = scale, ratio, hflip, color_jitter
        self.channels_last = channels_last
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``generator`` (on the images' device) draws the training augmentation; default: torch's global RNG."""
        if images.ndim == 3:  # one image [H, W, 3] -> [3, s, s], e.g. as a DataLoader worker's transform on a CPU
            return self.forward(images[None], generator)[0]
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2)  # [B, 3, H, W], channels-last strides
        if self.training_mode:
            x = self._augment(x.float(), generator)  # [B, 3, s, s] in 0..255
        else:
            x = self._centre_crop(x).float()  # [B, 3, s, s] in 0..255
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _centre_crop(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        s = self.image_size
        if H < s or W < s:
            raise ValueError(f"cached images are {H}x{W}, smaller than the {s}x{s} crop")
        top, left = int(round((H - s) / 2.0)), int(round((W - s) / 2.0))  # as torchvision's center_crop
        return x[:, :, top: top + s, left: left + s]

    def _augment(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        B, _, H, W = x.shape
        device, g = x.device, generator
        # RandomResizedCrop boxes, 10 candidates per image as timm/torchvision; the first that fits wins.
        tries = 10
        area = H * W * torch.empty(B, tries, device=device).uniform_(*self.scale, generator=g)
        log_ratio = torch.empty(B, tries, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]),
                                                                  generator=g)
        aspect = torch.exp(log_ratio)
        w = torch.sqrt(area * aspect).round()
        h = torch.sqrt(area / aspect).round()
        fits = (w <= W) & (h <= H) & (w > 0) & (h > 0)  # [B, tries]
        first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros(B, dtype=torch.long, device=device))
        rows = torch.arange(B, device=device)
        w, h = w[rows, first], h[rows, first]  # [B]
        fallback = ~fits.any(1)  # the whole image, as the fallback of RandomResizedCrop for these aspect ratios
        w = torch.where(fallback, torch.full_like(w, W), w)
        h = torch.where(fallback, torch.full_like(h, H), h)
        x0 = torch.floor(torch.rand(B, device=device, generator=g) * (W - w + 1))
        y0 = torch.floor(torch.rand(B, device=device, generator=g) * (H - h + 1))
        flip = torch.where(torch.rand(B, device=device, generator=g) < self.hflip, -1.0, 1.0)
        # Affine map from output to input coordinates in grid_sample's [-1, 1] units (align_corners=False).
        theta = torch.zeros(B, 2, 3, device=device)
        theta[:, 0, 0] = w / W * flip
        theta[:, 0, 2] = (2 * x0 + w) / W - 1
        theta[:, 1, 1] = h / H
        theta[:, 1, 2] = (2 * y0 + h) / H - 1
        s = self.image_size
        grid = torch.nn.functional.affine_grid(theta, [B, 3, s, s], align_corners=False)  # [B, s, s, 2]
        out = torch.nn.functional.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border",
                                              align_corners=False)  # [B, 3, s, s]
        if self.color_jitter > 0:
            out = self._jitter(out, g)
        return out

    def _jitter(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        B = x.shape[0]
        lo, hi = 1.0 - self.color_jitter, 1.0 + self.color_jitter
        factors = torch.empty(3, B, 1, 1, 1, device=x.device, dtype=x.dtype).uniform_(max(0.0, lo), hi,
                                                                                      generator=generator)
        x = (x * factors[0]).clamp(0, 255)  # brightness
        grey_weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        mean = (x * grey_weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # [B, 1, 1, 1]
        x = ((x - mean) * factors[1] + mean).clamp(0, 255)  # contrast
        grey = (x * grey_weights).sum(1, keepdim=True)  # [B, 1, H, W]
        return ((x - grey) * factors[2] + grey).clamp(0, 255)  # saturation


# What an image file decodes to depends on this code as well as on the file. Bump DECODE_VERSION with any change to
# `load_image`, `to_rgb` or `resize_for_cache` that alters the pixels: every cache keyed by `update_files_digest` (the
# cached features, the uint8 image cache) is then built again instead of being read stale. 1 (nineteenth session):
# upright by the EXIF orientation, transparency on white, 16-bit and floating-point images scaled to 8 bits.
DECODE_VERSION = 1


def decoding_key() -> str:
    """`DECODE_VERSION` and the versions of the libraries that decode and resize the images (Pillow, torchvision)."""
    import PIL
    import torchvision
    return f"decode {DECODE_VERSION}; Pillow {PIL.__version__}; torchvision {torchvision.__version__}"


def update_files_digest(h: Any, image_ids: Iterable[str], image_dir: str | Path) -> None:
    """Feed `decoding_key`, then each image file's name and a digest of its bytes, into the hash ``h``, for caches
    keyed by the images.

    The content, not the modification time: a copied or re-synced dataset (new times, same bytes) keeps its caches,
    and any change of an image's bytes invalidates them, as does a change of how they are decoded (`DECODE_VERSION`,
    a new Pillow or torchvision). Reading every file costs about a second per few hundred MB, far less than decoding
    them again.
    """
    h.update(f"{decoding_key()}\n".encode())
    for image_id in image_ids:
        try:
            data = (Path(image_dir) / image_id).read_bytes()
        except FileNotFoundError:
            h.update(f"{image_id}\0missing\n".encode())
        except OSError as e:  # unreadable (a folder, no permission): the loaders will report it with its row
            h.update(f"{image_id}\0unreadable {e.errno}\n".encode())
        else:
            h.update(f"{image_id}\0{len(data)}\0{hashlib.blake2b(data, digest_size=16).hexdigest()}\n".encode())

"""Image loading (modes, bad files, draft decoding) and the timm transforms."""
from __future__ import annotations

import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageFile

from multimodal.images import ImageLoadError, build_transform, load_image, resolve_image_config


def jpeg_bytes(width: int = 64, height: int = 48) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def test_rgb_jpeg(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes())
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_modes_become_rgb(tmp_path):
    grey = Image.new("L", (4, 3), 7)
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    palette = Image.new("P", (4, 3), 0)
    palette.putpalette([200, 0, 0, 0, 200, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    cmyk = Image.new("CMYK", (4, 3), (255, 0, 0, 0))  # cyan
    deep = Image.new("I;16", (4, 3), 0)
    deep.putpixel((0, 0), 65535)
    deep.putpixel((1, 0), 32896)

    grey.save(tmp_path / "l.png")
    rgba.save(tmp_path / "rgba.png")
    palette.save(tmp_path / "p.png", transparency=1)
    cmyk.save(tmp_path / "cmyk.jpg")
    deep.save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK" and Image.open(tmp_path / "i16.png").mode == "I;16"

    loaded = {name: load_image(tmp_path / name) for name in ("l.png", "rgba.png", "p.png", "cmyk.jpg", "i16.png")}
    assert all(image.mode == "RGB" and image.size == (4, 3) for image in loaded.values())
    assert loaded["l.png"].getpixel((2, 2)) == (7, 7, 7)
    assert loaded["rgba.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert loaded["rgba.png"].getpixel((1, 0)) == (10, 20, 30)
    assert loaded["p.png"].getpixel((0, 0)) == (200, 0, 0)
    assert loaded["p.png"].getpixel((1, 1)) == (255, 255, 255)  # transparent palette entry -> white
    np.testing.assert_allclose(loaded["cmyk.jpg"].getpixel((2, 2)), (0, 255, 255), atol=3)
    # 16-bit values are scaled, not clipped at 255.
    assert [loaded["i16.png"].getpixel((x, 0)) for x in range(3)] == [(255,) * 3, (128,) * 3, (0,) * 3]


def test_transparent_colour_of_grey_and_rgb_pngs_and_float_images(tmp_path):
    """A grey or RGB PNG's one transparent colour (tRNS) is white, as a palette's; a floating-point image in 0..1 is
    scaled (it came out black)."""
    grey = Image.new("L", (4, 3), 10)
    grey.putpixel((1, 1), 99)
    grey.save(tmp_path / "l.png", transparency=10)
    rgb = Image.new("RGB", (4, 3), (10, 20, 30))
    rgb.putpixel((1, 1), (1, 2, 3))
    rgb.save(tmp_path / "rgb.png", transparency=(10, 20, 30))
    assert "transparency" in Image.open(tmp_path / "rgb.png").info
    assert load_image(tmp_path / "l.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "l.png").getpixel((1, 1)) == (99, 99, 99)
    assert load_image(tmp_path / "rgb.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "rgb.png").getpixel((1, 1)) == (1, 2, 3)
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    unit.save(tmp_path / "f.tif")
    assert [load_image(tmp_path / "f.tif").getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]


def exif_rotated_jpeg(path, orientation: int = 6) -> np.ndarray:
    """A 48 x 32 JPEG stored sideways with an EXIF orientation tag; returns the upright pixels a viewer shows."""
    pixels = np.zeros((32, 48, 3), np.uint8)  # as stored: landscape, red on the left third
    pixels[:, :16] = (220, 30, 30)
    pixels[:, 16:] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    with Image.open(path) as img:
        from PIL import ImageOps
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def test_exif_orientation_turns_a_photo_upright_on_every_path(tmp_path):
    """A phone's portrait photo is stored sideways with an EXIF orientation: every loader turns it upright (it went
    in sideways): `load_image` (training, prediction, caches), the device decoder, and PIL images given to the
    Python API."""
    from multimodal.images import EncodedImageDecoder, to_rgb
    path = tmp_path / "portrait.jpg"
    upright = exif_rotated_jpeg(path)
    assert upright.shape == (48, 32, 3)  # orientation 6: turned a quarter, now portrait
    loaded = load_image(path)
    assert loaded.size == (32, 48) and np.array_equal(np.asarray(loaded), upright)
    assert load_image(path, draft_size=8).size == (8, 12)  # decoded at a quarter scale (12 x 8), then turned
    assert np.array_equal(np.asarray(to_rgb(Image.open(path))), upright)
    assert np.array_equal(np.asarray(to_rgb(to_rgb(Image.open(path)))), upright)  # turned once, not twice
    decoder = EncodedImageDecoder(32, squash=True)
    squares, errors = decoder([path.read_bytes()])
    expected, _ = decoder([_png_bytes(upright)])  # the upright pixels, through the same resize
    assert errors == [None] and torch.equal(squares, expected)
    # The orientation in XMP instead of EXIF, which Pillow honours too: every path agrees (the device decoder, which
    # looked for EXIF marks in the bytes, decoded it as stored).
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
           b'</x:xmpmeta>')
    stored = np.asarray(Image.open(path).convert("RGB"))
    Image.fromarray(stored).save(tmp_path / "xmp.jpg", quality=95, xmp=xmp)
    assert load_image(tmp_path / "xmp.jpg").size == (32, 48)
    assert torch.equal(decoder([(tmp_path / "xmp.jpg").read_bytes()])[0],
                       decoder([_png_bytes(np.asarray(load_image(tmp_path / "xmp.jpg")))])[0])


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_missing_file(tmp_path):
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageLoadError, match="missing.jpg: file not found") as info:
        load_image(path)
    assert info.value.path == path
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)


@pytest.mark.parametrize(
    "content", [b"not an image", jpeg_bytes()[:2000], jpeg_bytes()[:200]], ids=["corrupt", "truncated", "header-only"]
)
def test_bad_files_name_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: cannot decode image")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_draft_decodes_jpeg_smaller(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(640, 480))
    assert load_image(path).size == (640, 480)
    small = load_image(path, draft_size=100)  # largest 1/2^k reduction keeping both sides >= 100
    assert small.mode == "RGB" and small.size == (160, 120)


def test_eval_transform_follows_the_weights_config():
    for name in ("tf_efficientnet_lite0", "resnet18"):
        config = timm.get_pretrained_cfg(name)
        transform = build_transform(name, 40, training=False)
        out = transform(Image.new("RGB", (80, 60), (128, 64, 32)))
        assert out.shape == (3, 40, 40)
        expected = (torch.tensor([128, 64, 32]) / 255 - torch.tensor(config.mean)) / torch.tensor(config.std)
        torch.testing.assert_close(out[:, 20, 20], expected.float(), atol=1e-3, rtol=0)


def test_full_crop_keeps_the_borders_that_the_centre_crop_cuts():
    # A 4:3 image with red stripes at its left and right edges and grey elsewhere.
    array = np.full((60, 80, 3), 128, dtype=np.uint8)
    array[:, :6] = array[:, -6:] = (255, 0, 0)
    image = Image.fromarray(array)
    centre = build_transform("tf_efficientnet_lite0", 40, training=False)(image)
    full = build_transform("tf_efficientnet_lite0", 40, training=False, crop="full")(image)
    assert centre.shape == full.shape == (3, 40, 40)
    red_minus_green = lambda x: (x[0] - x[1])[:, [0, -1]]  # noqa: E731  left and right columns
    assert (red_minus_green(full) > 1.5).all() and (red_minus_green(centre).abs() < 0.1).all()
    assert resolve_image_config("tf_efficientnet_lite0", 40, "full")["crop_pct"] == 1.0
    with pytest.raises(ValueError, match="crop must be one of"):
        build_transform("tf_efficientnet_lite0", 40, training=False, crop="squash")


def test_training_transform_augments():
    transform = build_transform("tf_efficientnet_lite0", 32, training=True)
    names = [type(t).__name__ for t in transform.transforms]
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert not any("Augment" in name for name in names)
    gradient = Image.fromarray(np.tile(np.arange(0, 256, 2, dtype=np.uint8), (96, 1)), "L").convert("RGB")
    torch.manual_seed(0)
    outs = [transform(gradient) for _ in range(4)]
    assert all(out.shape == (3, 32, 32) for out in outs)
    assert any(not torch.equal(outs[0], out) for out in outs[1:])


def test_transform_from_a_wrapped_model():
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)

    config = resolve_image_config(Wrapper(), 48)
    assert config["input_size"] == (3, 48, 48)
    assert config["mean"] == timm.get_pretrained_cfg("resnet18").mean
    assert build_transform(Wrapper(), 48, training=False)(Image.new("RGB", (50, 50))).shape == (3, 48, 48)


@pytest.mark.comp5329
def test_real_images(comp5329_dir):
    for name in ("0.jpg", "30000.jpg"):
        image = load_image(comp5329_dir / "data" / name)
        assert image.mode == "RGB" and max(image.size) > 100
        assert max(load_image(comp5329_dir / "data" / name, draft_size=64).size) < max(image.size)

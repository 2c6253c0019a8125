"""Write the image-preprocessing fixtures under fixtures/images/.

Run from the repository root:

    /opt/refenv/bin/python tools/fixtures_images.py

Environment: /opt/refenv as described in tools/requirements.txt, plus scikit-image 0.26.0
(`pip install scikit-image==0.26.0`), whose bundled sample photographs are the sources. No network
access is needed, and every random input is seeded, so a rerun rewrites the same files.

The script writes:
- photographs, downscaled to at most 256 px and saved as JPEG (quality 90, 4:2:0 chroma):
  astronaut.jpg (square), chelsea.jpg (landscape) and coffee.jpg (a portrait crop);
- variants of chelsea downscaled to 128 x 85, one per decoding path: RGB PNG, BMP, grayscale
  PNG and JPEG, gray+alpha, RGBA, palette, CMYK JPEG, 16-bit RGB and 16-bit gray PNG, animated
  GIF, animated WebP and APNG. Copies tagged with EXIF orientation 6 come as JPEG, PNG, WebP
  and TIFF;
- `<file name>.<size>.npy` (for example `gray.png.32.npy`): the expected float32 [3, size, size]
  model input, from open_clip's own transform (`open_clip.image_transform(size, is_train=False)`)
  on the image as Pillow opens it. Every image except the lossless orientation-6 copies has one
  at size 32, and the three photographs also at 224. A 224 tensor takes 600 KB, so one per variant would push the
  directory well past 3 MB;
- `resize/`: a 61 x 47 source and Pillow's `Image.resize(..., BICUBIC)` output for upscaling,
  downscaling and one-axis cases, as PNG, for a byte-exact check of the resampler;
- tall.png: a 60 x 160 crop, which Pillow 13 resizes to 32 x 85 with the vertical pass first;
- huge_header.png: a PNG claiming 100000 x 100000 pixels, with data for its first row only;
- astronaut.pillow.png: the pixels Pillow decodes from astronaut.jpg, so the resize and
  normalization of a photograph at 224 can be checked apart from the JPEG decoder.

Where the engine deliberately differs from open_clip's Pillow pipeline, the expected tensor is
computed from the input the engine is specified to see, and `DEVIATIONS` names the reason:
palette images (Pillow resizes mode P with nearest-neighbour sampling), images with alpha (Pillow
resizes RGBA and LA premultiplied), 16-bit grayscale (Pillow's convert("RGB") clamps I;16 values
to 255), CMYK (Pillow resizes the CMYK channels before converting) and EXIF orientation (Pillow
ignores it).
"""

import struct
import zlib
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image, ImageOps
from skimage import data as skdata

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "images"
RESIZE_OUT = OUT / "resize"

LONG_SIDE = 256
VARIANT_SIZE = (128, 85)
JPEG_QUALITY = 90
SEED = 3001

EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation 6: the stored image must be rotated 90 degrees clockwise to be upright.
ORIENTATION_ROTATED_CW = 6

# (width, height) of Pillow's output for each resampler case, from the 61 x 47 source.
RESIZE_CASES = [
    (224, 224),  # upscale both axes
    (23, 17),  # downscale both axes
    (61, 150),  # vertical only, upscale
    (61, 9),  # vertical only, downscale
    (200, 47),  # horizontal only, upscale
    (13, 47),  # horizontal only, downscale
    (150, 20),  # horizontal up, vertical down (Pillow 13 runs the vertical pass first)
    (55, 10),  # both down, height by more than twice as many pixels (vertical pass first)
    (1, 1),  # everything into one pixel
]

# Images whose expected tensor is not open_clip's transform of the image as Pillow opens it,
# with the reason. The engine converts to 8-bit RGB when decoding, before resizing.
DEVIATIONS = {
    "gray_alpha.png": "Pillow resizes LA premultiplied, but the engine drops alpha first",
    "rgba.png": "Pillow resizes RGBA premultiplied, but the engine drops alpha first",
    "palette.png": "Pillow resizes mode P with nearest-neighbour, but the engine converts to RGB first",
    "animated.gif": "Pillow resizes the first GIF frame (mode P) with nearest-neighbour",
    "gray16.png": "Pillow's convert('RGB') clamps I;16 to 255, but the engine scales by 255/65535",
    "cmyk.jpg": "Pillow resizes CMYK channels before converting, but the engine converts first",
}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    RESIZE_OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    photos = {
        "astronaut.jpg": fit_long_side(Image.fromarray(skdata.astronaut())),
        "chelsea.jpg": fit_long_side(Image.fromarray(skdata.chelsea())),
        # A portrait crop of the landscape photograph, so both branches of the shorter-side
        # arithmetic are covered.
        "coffee.jpg": fit_long_side(Image.fromarray(skdata.coffee()).crop((150, 0, 450, 400))),
    }
    for name, image in photos.items():
        image.save(OUT / name, quality=JPEG_QUALITY)
        write_expected(name, Image.open(OUT / name), sizes=(224, 32))

    base = Image.fromarray(skdata.chelsea()).resize(VARIANT_SIZE, Image.Resampling.LANCZOS)
    write_variants(base, rng)
    write_orientation_fixtures(base)
    write_resize_cases()
    tall = Image.fromarray(skdata.astronaut()).crop((300, 100, 360, 260))
    tall.save(OUT / "tall.png")
    write_expected("tall.png", tall, sizes=(32,))
    (OUT / "huge_header.png").write_bytes(png_first_row_only(100_000, 100_000))
    Image.open(OUT / "astronaut.jpg").save(OUT / "astronaut.pillow.png")

    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


def fit_long_side(image):
    scale = LONG_SIDE / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.Resampling.LANCZOS)


def write_variants(base, rng):
    """Write one file per decoding path, each with its expected tensor at size 32."""
    width, height = base.size
    rgb = np.asarray(base)
    gray = np.asarray(base.convert("L"))
    # Alpha that varies across the image and is 0 in the top-left corner.
    alpha = np.clip(np.add.outer(np.arange(height) * 3, np.arange(width) * 2) - 20, 0, 255)
    alpha = alpha.astype(np.uint8)

    # Each file maps to the image its expected tensor is computed from, or to None when that is
    # the file as Pillow opens it.
    variants = {}
    base.save(OUT / "rgb.png")
    variants["rgb.png"] = None
    base.save(OUT / "rgb.bmp")
    variants["rgb.bmp"] = None
    Image.fromarray(gray).save(OUT / "gray.png")
    variants["gray.png"] = None
    Image.fromarray(gray).save(OUT / "gray.jpg", quality=JPEG_QUALITY)
    variants["gray.jpg"] = None

    Image.fromarray(np.dstack([gray, alpha]), "LA").save(OUT / "gray_alpha.png")
    variants["gray_alpha.png"] = Image.fromarray(gray)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(OUT / "rgba.png")
    variants["rgba.png"] = base

    palette = base.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    palette.save(OUT / "palette.png")
    variants["palette.png"] = Image.open(OUT / "palette.png").convert("RGB")

    base.convert("CMYK").save(OUT / "cmyk.jpg", quality=JPEG_QUALITY)
    assert Image.open(OUT / "cmyk.jpg").mode == "CMYK"
    variants["cmyk.jpg"] = Image.open(OUT / "cmyk.jpg").convert("RGB")

    # 16-bit samples 256 * v + low with |low - v| <= 64 map to v both in the engine (round(x * 255
    # / 65535)) and in Pillow's RGB;16B unpacking (the high byte), so the two agree on this file.
    (OUT / "rgb16.png").write_bytes(png_16bit(to_16bit(rgb, rng)))
    assert np.array_equal(np.asarray(Image.open(OUT / "rgb16.png").convert("RGB")), rgb)
    variants["rgb16.png"] = None
    (OUT / "gray16.png").write_bytes(png_16bit(to_16bit(gray, rng)))
    assert Image.open(OUT / "gray16.png").mode == "I;16"
    variants["gray16.png"] = Image.fromarray(gray)

    # In each animation the first frame is the base image, and the engine must ignore the others.
    later = [ImageOps.invert(base), base.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    gif_frames = [frame.quantize(colors=128, method=Image.Quantize.MEDIANCUT) for frame in [base, *later]]
    gif_frames[0].save(OUT / "animated.gif", save_all=True, append_images=gif_frames[1:], duration=100, loop=0)
    variants["animated.gif"] = Image.open(OUT / "animated.gif").convert("RGB")
    base.save(OUT / "animated.webp", save_all=True, append_images=later, lossless=True, duration=100)
    variants["animated.webp"] = None
    base.save(OUT / "animated.png", save_all=True, append_images=later, duration=100)
    variants["animated.png"] = None

    for name, reference in variants.items():
        opened = Image.open(OUT / name)
        assert (reference is None) == (name not in DEVIATIONS), name
        check_frame_count(name, opened)
        write_expected(name, opened if reference is None else reference, sizes=(32,))


def check_frame_count(name, opened):
    """Check that Pillow reads all three frames of an animation, so the first-frame test means something."""
    if name.startswith("animated"):
        assert getattr(opened, "n_frames", 1) == 3, (name, getattr(opened, "n_frames", 1))


def write_orientation_fixtures(base):
    """Write the base image stored rotated, tagged with EXIF orientation 6, in four formats.

    The engine must return the upright base image: exactly for the lossless formats, and for the
    JPEG close to the expected tensor of Pillow's exif_transpose of the decoded file.
    """
    stored = base.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ORIENTATION_ROTATED_CW

    stored.save(OUT / "orientation6.jpg", quality=JPEG_QUALITY, exif=exif)
    stored.save(OUT / "orientation6.png", exif=exif)
    stored.save(OUT / "orientation6.webp", lossless=True, exif=exif)
    stored.save(OUT / "orientation6.tif", tiffinfo={EXIF_ORIENTATION_TAG: ORIENTATION_ROTATED_CW})

    for name in ("orientation6.jpg", "orientation6.png", "orientation6.webp", "orientation6.tif"):
        opened = Image.open(OUT / name)
        assert opened.getexif().get(EXIF_ORIENTATION_TAG) == ORIENTATION_ROTATED_CW, name
        upright = ImageOps.exif_transpose(opened)
        assert upright.size == base.size, name
        if name != "orientation6.jpg":
            assert np.array_equal(np.asarray(upright.convert("RGB")), np.asarray(base)), name
    write_expected("orientation6.jpg", ImageOps.exif_transpose(Image.open(OUT / "orientation6.jpg")), sizes=(32,))


def write_resize_cases():
    source = Image.fromarray(skdata.astronaut()).crop((200, 100, 261, 147))
    assert source.size == (61, 47)
    source.save(RESIZE_OUT / "source.png")
    for width, height in RESIZE_CASES:
        source.resize((width, height), Image.Resampling.BICUBIC).save(RESIZE_OUT / f"{width}x{height}.png")


def write_expected(name, image, sizes):
    for size in sizes:
        transform = open_clip.image_transform(size, is_train=False)
        with torch.no_grad():
            pixels = transform(image).numpy().astype(np.float32)
        assert pixels.shape == (3, size, size), pixels.shape
        np.save(OUT / f"{name}.{size}.npy", pixels)


def to_16bit(samples, rng):
    """Widen 8-bit samples v to 16 bits with a low byte near v, so that round(x * 255 / 65535) == v."""
    low = samples.astype(np.int32) + rng.integers(-64, 65, size=samples.shape)
    return (samples.astype(np.uint16) << 8) | np.clip(low, 0, 255).astype(np.uint16)


def png_chunk(kind, payload):
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def png_16bit(samples):
    """Encode a uint16 array of shape (h, w) or (h, w, 3) as a 16-bit PNG (Pillow cannot write RGB16)."""
    height, width = samples.shape[:2]
    color_type = 2 if samples.ndim == 3 else 0
    rows = samples.astype(">u2").reshape(height, -1).view(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b"")


def png_first_row_only(width, height):
    """Encode a gray PNG header for width x height with image data for the first row only."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    first_row = zlib.compress(b"\x00" * (width + 1), 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", first_row) + png_chunk(b"IEND", b"")


if __name__ == "__main__":
    main()

"""Small Pillow 10.3.0 fixtures for the processor tests (crates/phi3v/tests/processor_pillow.rs).

Run from this directory with Pillow==10.3.0 (and numpy) installed:

    python make_fixtures.py

It writes, next to itself:
  decode/<case>.<ext>      encoded test images (made here, deterministic)
  decode/<case>.rgb        Pillow's Image.open(f).convert("RGB") as raw HWC bytes
  resize/src.rgb           a 23x17 RGB source; resize/<w>x<h>.rgb = src.resize((w, h), BILINEAR)
  hd/<case>.png            the reference HD_transform output for hd/<case>_src.png
  manifest.json            sizes, and which inputs Pillow refuses
"""

import io
import json
import math
import os
import re
import struct
import zlib

import numpy as np
import PIL
from PIL import Image

assert PIL.__version__ == "10.3.0", PIL.__version__
HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(1234)


def smooth_rgb(w, h, noise=24):
    """A gradient with a blob and some noise: exercises chroma subsampling and rounding."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127 + 120 * np.sin(x / 3.0) * np.cos(y / 4.0)
    img = np.stack([r, g, b], -1) + rng.normal(0, noise, (h, w, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write(path, data):
    full = os.path.join(HERE, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(data)


manifest = {"pillow": PIL.__version__, "decode": [], "resize": [], "hd": []}


def add_decode(name, data):
    """Stores the encoded file and what Pillow makes of it."""
    write(f"decode/{name}", data)
    entry = {"file": name}
    try:
        im = Image.open(io.BytesIO(data))
        entry["mode"] = im.mode
        rgb = im.convert("RGB")
        entry["width"], entry["height"] = rgb.size
        write(f"decode/{name}.rgb", rgb.tobytes())
    except Exception as e:  # Pillow refuses it: so must we.
        # Drop object addresses ("<_io.BytesIO object at 0x...>") so reruns are byte-identical.
        entry["pillow_error"] = re.sub(r" at 0x[0-9a-f]+", "", f"{type(e).__name__}: {e}")
    manifest["decode"].append(entry)


def encode(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------- JPEG
base = Image.fromarray(smooth_rgb(37, 29))
add_decode("q95_444.jpg", encode(base, "JPEG", quality=95, subsampling=0))
add_decode("q90_420.jpg", encode(base, "JPEG", quality=90, subsampling=2))
add_decode("q80_422.jpg", encode(base, "JPEG", quality=80, subsampling=1))
add_decode("progressive_420.jpg", encode(base, "JPEG", quality=85, progressive=True))
add_decode("gray.jpg", encode(base.convert("L"), "JPEG", quality=90))
add_decode("cmyk.jpg", encode(base.convert("CMYK"), "JPEG", quality=90))
big = Image.fromarray(smooth_rgb(61, 47))
add_decode("q75_420_61x47.jpg", encode(big, "JPEG", quality=75))
jpg = encode(base, "JPEG", quality=90)
add_decode("truncated_half.jpg", jpg[: len(jpg) // 2])
add_decode("no_eoi.jpg", jpg[:-2])

# ---------------------------------------------------------------- PNG
rgba = np.concatenate([smooth_rgb(19, 13), rng.integers(0, 256, (13, 19, 1), dtype=np.uint8)], -1)
add_decode("rgb8.png", encode(Image.fromarray(smooth_rgb(19, 13)), "PNG"))
add_decode("rgba8.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"))
add_decode("l8.png", encode(Image.fromarray(smooth_rgb(19, 13)[..., 0]), "PNG"))
add_decode("la8.png", encode(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"))
pal = Image.fromarray(smooth_rgb(19, 13)).quantize(colors=37)
add_decode("p8.png", encode(pal, "PNG"))
add_decode("p8_trns.png", encode(pal, "PNG", transparency=3))
add_decode("l8_trns.png", encode(Image.fromarray(smooth_rgb(19, 13)[..., 1]), "PNG", transparency=40))


def png(w, h, bit_depth, color_type, raw_rows, extra_chunks=(), interlace=0):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, interlace)
    body = b"".join(chunk(t, d) for t, d in extra_chunks)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body + chunk(b"IDAT", zlib.compress(raw_rows)) + chunk(b"IEND", b"")


w16, h16 = 7, 5
v16 = rng.integers(0, 65536, (h16, w16, 4)).astype(">u2")
v16[0, :4, 0] = [0, 255, 256, 65535]  # around I;16's clamp at 255
rows = lambda a: b"".join(b"\x00" + a[y].tobytes() for y in range(a.shape[0]))
add_decode("gray16.png", png(w16, h16, 16, 0, rows(v16[..., :1])))
add_decode("gray16_trns.png", png(w16, h16, 16, 0, rows(v16[..., :1]), [(b"tRNS", struct.pack(">H", 256))]))
add_decode("rgb16.png", png(w16, h16, 16, 2, rows(v16[..., :3])))
add_decode("rgba16.png", png(w16, h16, 16, 6, rows(v16)))
add_decode("la16.png", png(w16, h16, 16, 4, rows(v16[..., :2])))
bits1 = np.packbits(rng.integers(0, 2, (5, 16), dtype=np.uint8), axis=1)
add_decode("gray1.png", png(16, 5, 1, 0, rows(bits1)))
nib = rng.integers(0, 16, (5, 16), dtype=np.uint8)
add_decode("gray4.png", png(16, 5, 4, 0, rows((nib[:, 0::2] << 4 | nib[:, 1::2]).astype(np.uint8))))
# Adam7-interlaced 8-bit RGB, written by hand.
iw, ih = 11, 9
ipx = smooth_rgb(iw, ih)
passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
raw = b""
for x0, y0, dx, dy in passes:
    sub = ipx[y0::dy, x0::dx]
    if sub.size:
        raw += rows(sub)
add_decode("rgb8_interlaced.png", png(iw, ih, 8, 2, raw, interlace=1))
p = encode(Image.fromarray(smooth_rgb(19, 13)), "PNG")
add_decode("truncated.png", p[: len(p) // 2])

# ---------------------------------------------------------------- GIF


def gif_lzw(indices, min_code_size):
    """Valid LZW without compression: a clear code before the table would widen the codes."""
    clear, end = 1 << min_code_size, (1 << min_code_size) + 1
    size = min_code_size + 1
    codes, run = [clear], 0
    for i in indices:
        if run == (1 << min_code_size) - 2:
            codes.append(clear)
            run = 0
        codes.append(int(i))
        run += 1
    codes.append(end)
    bits, nbits, out = 0, 0, bytearray()
    for c in codes:
        bits |= c << nbits
        nbits += size
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8
    if nbits:
        out.append(bits & 0xFF)
    data = bytearray([min_code_size])
    for k in range(0, len(out), 255):
        blk = out[k : k + 255]
        data += bytes([len(blk)]) + blk
    return bytes(data + b"\x00")


def gif(screen, frame_box, indices, global_pal=None, local_pal=None, transparent=None, min_code_size=2):
    sw, sh = screen
    x0, y0, fw, fh = frame_box
    out = b"GIF89a" + struct.pack("<HH", sw, sh)
    if global_pal is not None:
        n = len(global_pal) // 3
        bits = max(int(math.ceil(math.log2(max(n, 2)))), 1)
        pal = bytes(global_pal) + b"\x00" * (3 * (1 << bits) - len(global_pal))
        out += bytes([0x80 | 0x70 | (bits - 1), 0, 0]) + pal
    else:
        out += bytes([0x70, 0, 0])
    if transparent is not None:
        out += b"\x21\xf9\x04" + bytes([1]) + b"\x00\x00" + bytes([transparent]) + b"\x00"
    flags = 0
    lp = b""
    if local_pal is not None:
        n = len(local_pal) // 3
        bits = max(int(math.ceil(math.log2(max(n, 2)))), 1)
        lp = bytes(local_pal) + b"\x00" * (3 * (1 << bits) - len(local_pal))
        flags = 0x80 | (bits - 1)
    out += b"\x2c" + struct.pack("<HHHH", x0, y0, fw, fh) + bytes([flags]) + lp
    out += gif_lzw(indices, min_code_size) + b"\x3b"
    return out


pal8 = [int(v) for v in rng.integers(0, 256, 24)]
idx = rng.integers(0, 8, 6 * 5)
add_decode("simple.gif", gif((6, 5), (0, 0, 6, 5), idx, global_pal=pal8, min_code_size=3))
add_decode("transparent.gif", gif((6, 5), (0, 0, 6, 5), idx, global_pal=pal8, transparent=2, min_code_size=3))
add_decode("offset_frame.gif", gif((9, 8), (2, 3, 6, 5), idx, global_pal=pal8, min_code_size=3))
add_decode("offset_frame_trns.gif", gif((9, 8), (2, 3, 6, 5), idx, global_pal=pal8, transparent=5, min_code_size=3))
add_decode("frame_past_screen.gif", gif((4, 4), (1, 1, 6, 5), idx, global_pal=pal8, min_code_size=3))
add_decode("local_palette.gif", gif((6, 5), (0, 0, 6, 5), idx, global_pal=pal8, local_pal=pal8[::-1], min_code_size=3))
# Two palette entries, indices up to 3: Pillow maps 2 and 3 through its default gray ramp.
add_decode("short_palette.gif", gif((6, 5), (0, 0, 6, 5), rng.integers(0, 4, 30), global_pal=[10, 20, 30, 200, 100, 50]))
add_decode("gray_palette.gif", gif((6, 5), (0, 0, 6, 5), idx, global_pal=[v for i in range(8) for v in (i, i, i)], min_code_size=3))
# Pillow's own writer, for a realistic file.
add_decode("pillow_written.gif", encode(Image.fromarray(smooth_rgb(19, 13)).quantize(colors=50), "GIF"))

# ---------------------------------------------------------------- WebP
add_decode("lossless.webp", encode(Image.fromarray(smooth_rgb(19, 13)), "WEBP", lossless=True))
add_decode("lossless_alpha.webp", encode(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True))
add_decode("lossy.webp", encode(Image.fromarray(smooth_rgb(37, 29)), "WEBP", quality=80))
add_decode("lossy_alpha.webp", encode(Image.fromarray(np.concatenate([smooth_rgb(37, 29), np.full((29, 37, 1), 200, np.uint8)], -1), "RGBA"), "WEBP", quality=80))

# ---------------------------------------------------------------- BMP
add_decode("rgb24.bmp", encode(Image.fromarray(smooth_rgb(19, 13)), "BMP"))
add_decode("p8.bmp", encode(pal, "BMP"))
add_decode("l8.bmp", encode(Image.fromarray(smooth_rgb(19, 13)[..., 2]), "BMP"))

# ---------------------------------------------------------------- garbage
add_decode("garbage.jpg", bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
add_decode("jpeg_magic_then_garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))

# ---------------------------------------------------------------- resize (Pillow bilinear)
src = Image.fromarray(rng.integers(0, 256, (17, 23, 3), dtype=np.uint8))
write("resize/src.rgb", src.tobytes())
manifest["resize_src"] = [23, 17]
for w, h in [(23, 17), (46, 34), (10, 7), (23, 40), (50, 17), (7, 31), (1, 1), (64, 5), (3, 17), (24, 18), (22, 16), (69, 51)]:
    write(f"resize/{w}x{h}.rgb", src.resize((w, h), Image.BILINEAR).tobytes())
    manifest["resize"].append([w, h])


# ---------------------------------------------------------------- HD transform (the reference's arithmetic)
def hd_transform(img, hd_num):
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.TRANSPOSE)
        trans = True
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    # torchvision F.resize on a PIL image: PIL resize with BILINEAR (returns img if same size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.BILINEAR)
    # padding_336: torchvision F.pad(fill=255) -> ImageOps.expand: white canvas, pasted
    tar = int(np.ceil(new_h / 336) * 336)
    top = int((tar - new_h) / 2)
    canvas = Image.new("RGB", (new_w, tar), (255, 255, 255))
    canvas.paste(img, (0, top))
    if trans:
        canvas = canvas.transpose(Image.TRANSPOSE)
    return canvas


for name, (w, h), n in [("land_40x30_n1", (40, 30), 1), ("port_30x50_n2", (30, 50), 2), ("land_700x90_n3", (700, 90), 3)]:
    im = Image.fromarray(smooth_rgb(w, h, noise=6))
    write(f"hd/{name}_src.png", encode(im, "PNG"))
    out = hd_transform(im, n)
    write(f"hd/{name}.png", encode(out, "PNG", optimize=True))
    manifest["hd"].append({"name": name, "num_crops": n, "hd": list(out.size)})

with open(os.path.join(HERE, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
print(json.dumps(manifest, indent=1)[:3000])

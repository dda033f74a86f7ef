#!/usr/bin/env python3
"""Generate the tiny Phi-3-vision checkpoint and the golden tensors the Rust tests compare against.

Run through `cargo xtask fixtures`, which installs the pinned reference environment
(xtask/python/requirements.txt) into .pyref/, plus transformers 4.41.2 for the decoder
(xtask/python/requirements-phi3.txt, `pip install --no-deps --target .pyref/transformers-phi3`), and calls

    .pyref/bin/python xtask/python/make_fixtures.py --out fixtures --tokenizer ../shared/phi3v-tokenizer

What it writes (all deterministic: fixed seeds, one CPU thread, float32 compute):

  fixtures/tiny-phi3v/       random-weight checkpoint in the real Phi-3-vision layout (2 bf16 shards +
                             index, config.json, preprocessor_config.json, tokenizer files)
  fixtures/images/           synthetic photo-like inputs and decoder edge cases
  fixtures/golden/decoded/   Pillow's Image.open(p).convert("RGB") of every input, as PNG
  fixtures/golden/norm_table.safetensors   ToTensor+Normalize of every uint8 value, f32 [3, 256]
  fixtures/golden/<case>/    case.json, tensors.safetensors, hd_<k>.png per end-to-end case
                             (layout and the de-duplication rule: fixtures/README.md, prepare_case)

The reference follows the spec (shared/spec/phi3v.md) and the Microsoft remote code it restates:
  - image processor (spec §2): the same torchvision/Pillow calls as Phi3VImageProcessor.preprocess;
  - prompt processor (spec §3): chunked tokenisation with the HF fast tokenizer, BOS per chunk,
    negative placeholder ids;
  - CLIP: transformers CLIPVisionModel (eager), hidden_states[-2] without CLS (spec §4.1);
  - 2x2 merge, sub_GN/glb_GN layout, projector (spec §4.2-4.6), written here in torch;
  - decoder (spec §5): transformers' own Phi3ForCausalLM. transformers 4.40.2 has no Phi-3 model
    (Phi-3-vision ships its own copy in modeling_phi3_v.py); it arrived in 4.41, so
    phi3_reference.py runs transformers 4.41.2 (eager attention, f32, rope_scaling "su" from
    config.json, factor set chosen per forward call from max(position_ids) + 1 >
    original_max_position_embeddings) in a separate process, fed the inputs_embeds computed here.
    All decoder goldens (logits, generated_ids, generated_margins, rope_long_per_call) are its.
    `Phi3Decoder` below, a hand-written op-for-op restatement of modeling_phi3_v.py's eager path,
    is kept as a cross-check: its prefill logits must match to relative L2 < 1e-5 and its greedy
    tokens must match wherever the margin exceeds 1e-3.
Weights are generated in f32, rounded to bf16 for storage and upcast back to f32 for the
reference, so the Rust engine and the reference see identical values.
"""

import argparse
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

# ------------------------------------------------------------------------------------------------
# Tiny configuration (real layout, small sizes)

VOCAB = 32064
HIDDEN = 96
INTERMEDIATE = 192
N_LAYERS = 2
N_HEADS = 2
HEAD_DIM = HIDDEN // N_HEADS  # 48
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
MAX_POS = 4096
ORIG_MAX_POS = 1024

CLIP_HIDDEN = 128
CLIP_INTERMEDIATE = 256
CLIP_LAYERS = 3  # hidden_states[-2] = output of the 2nd layer; the 3rd is stored but unused
CLIP_HEADS = 2
CLIP_EPS = 1e-5
IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24
MERGED = 4 * CLIP_HIDDEN  # 512

DEFAULT_NUM_CROPS = 4
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_TAG = r"<\|image_\d+\|>"

WEIGHT_SEED = 20240521
IMAGE_SEED = 1234

# Decoder goldens come from transformers' Phi3ForCausalLM, run by this script in its own process.
PHI3_REFERENCE = Path(__file__).resolve().parent / "phi3_reference.py"
# Hand-written Phi3Decoder vs transformers: prefill logits relative L2, and the greedy-token margin
# above which the two must pick the same token.
CROSS_CHECK_REL_L2 = 1e-5
CROSS_CHECK_MARGIN = 1e-3


def rope_factors():
    """Plausible LongRoPE arrays (one entry per frequency pair, HEAD_DIM/2 = 24).

    short_factor: decimal literals in [1, 3], like the real short arrays;
    long_factor: f32 values printed as f64 in [1, 40], like the real long arrays.
    """
    n = HEAD_DIM // 2
    short = [round(1.0 + 1.95 * (k / (n - 1)) ** 1.5, 2) for k in range(n)]
    long = [float(np.float32(1.0 + 38.0 * (k / (n - 1)) ** 2 + 0.02 * k)) for k in range(n)]
    return short, long


def model_config():
    short, long = rope_factors()
    return {
        "_name_or_path": "tiny-phi3v",
        "architectures": ["Phi3VForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        },
        "bos_token_id": 1,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "embd_pdrop": 0.0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "img_processor": {
            "image_dim_out": CLIP_HIDDEN,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            # Project extension: the remote code hard-codes ViT-L/14-336; this tiny checkpoint
            # needs its CLIP sizes in the file. Absent in real checkpoints (use the ViT-L preset).
            "clip_config": {
                "hidden_size": CLIP_HIDDEN,
                "intermediate_size": CLIP_INTERMEDIATE,
                "num_hidden_layers": CLIP_LAYERS,
                "num_attention_heads": CLIP_HEADS,
                "layer_norm_eps": CLIP_EPS,
            },
        },
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POS,
        "model_type": "phi3_v",
        "num_attention_heads": N_HEADS,
        "num_hidden_layers": N_LAYERS,
        "num_key_value_heads": N_HEADS,
        "original_max_position_embeddings": ORIG_MAX_POS,
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": RMS_EPS,
        "rope_scaling": {"long_factor": long, "short_factor": short, "type": "su"},
        "rope_theta": ROPE_THETA,
        "sliding_window": MAX_POS,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.2",
        "use_cache": True,
        "vocab_size": VOCAB,
        "_attn_implementation": "flash_attention_2",
    }


def preprocessor_config(num_crops=DEFAULT_NUM_CROPS):
    return {
        "auto_map": {
            "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
            "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        },
        "do_convert_rgb": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_processor_type": "Phi3VImageProcessor",
        "image_std": OPENAI_CLIP_STD,
        "num_crops": num_crops,
        "num_img_tokens": 144,
        "processor_class": "Phi3VProcessor",
    }


# ------------------------------------------------------------------------------------------------
# Random weights, in the checkpoint's state-dict order (the order HF shards in)


def make_weights():
    rng = np.random.default_rng(WEIGHT_SEED)
    w = {}

    def normal(name, shape, std, mean=0.0):
        w[name] = torch.from_numpy((mean + std * rng.standard_normal(shape)).astype(np.float32))

    def linear(name, out_dim, in_dim, bias):
        normal(f"{name}.weight", (out_dim, in_dim), 1.0 / math.sqrt(in_dim))
        if bias:
            normal(f"{name}.bias", (out_dim,), 0.02)

    def norm(name, dim, bias):
        normal(f"{name}.weight", (dim,), 0.1, mean=1.0)
        if bias:
            normal(f"{name}.bias", (dim,), 0.05)

    normal("model.embed_tokens.weight", (VOCAB, HIDDEN), 0.5)

    v = "model.vision_embed_tokens."
    c = v + "img_processor.vision_model."
    normal(c + "embeddings.class_embedding", (CLIP_HIDDEN,), 0.5)
    normal(c + "embeddings.patch_embedding.weight", (CLIP_HIDDEN, 3, PATCH, PATCH), 1.0 / math.sqrt(3 * PATCH * PATCH))
    normal(c + "embeddings.position_embedding.weight", (GRID * GRID + 1, CLIP_HIDDEN), 0.2)
    norm(c + "pre_layrnorm", CLIP_HIDDEN, bias=True)
    for l in range(CLIP_LAYERS):
        p = f"{c}encoder.layers.{l}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            linear(p + "self_attn." + proj, CLIP_HIDDEN, CLIP_HIDDEN, bias=True)
        norm(p + "layer_norm1", CLIP_HIDDEN, bias=True)
        linear(p + "mlp.fc1", CLIP_INTERMEDIATE, CLIP_HIDDEN, bias=True)
        linear(p + "mlp.fc2", CLIP_HIDDEN, CLIP_INTERMEDIATE, bias=True)
        norm(p + "layer_norm2", CLIP_HIDDEN, bias=True)
    norm(c + "post_layernorm", CLIP_HIDDEN, bias=True)
    normal(v + "glb_GN", (1, 1, MERGED), 1.0)
    normal(v + "sub_GN", (1, 1, 1, MERGED), 1.0)
    linear(v + "img_projection.0", HIDDEN, MERGED, bias=True)
    linear(v + "img_projection.2", HIDDEN, HIDDEN, bias=True)

    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        linear(p + "self_attn.o_proj", HIDDEN, HIDDEN, bias=False)
        linear(p + "self_attn.qkv_proj", 3 * HIDDEN, HIDDEN, bias=False)
        linear(p + "mlp.gate_up_proj", 2 * INTERMEDIATE, HIDDEN, bias=False)
        linear(p + "mlp.down_proj", HIDDEN, INTERMEDIATE, bias=False)
        norm(p + "input_layernorm", HIDDEN, bias=False)
        norm(p + "post_attention_layernorm", HIDDEN, bias=False)
    norm("model.norm", HIDDEN, bias=False)
    normal("lm_head.weight", (VOCAB, HIDDEN), 0.35)
    return {k: t.to(torch.bfloat16) for k, t in w.items()}


def write_checkpoint(out_dir, weights, tokenizer_dir):
    """Two shards split at half the bytes in state-dict order (so one layer straddles them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(weights)
    sizes = [weights[n].numel() * weights[n].element_size() for n in names]
    total = sum(sizes)
    shards = [{}, {}]
    acc = 0
    for n, s in zip(names, sizes):
        shards[0 if acc < total // 2 else 1][n] = weights[n].contiguous()
        acc += s
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out_dir / "model.safetensors.index.json", index)
    write_json(out_dir / "config.json", model_config())
    write_json(out_dir / "preprocessor_config.json", preprocessor_config())
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir / f, out_dir / f)


def load_checkpoint_f32(ckpt_dir):
    """Read the shards back exactly as stored and upcast bf16 -> f32 (what the reference runs on)."""
    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        for k, t in load_file(str(ckpt_dir / fname)).items():
            assert t.dtype == torch.bfloat16, k
            out[k] = t.float()
    assert set(out) == set(index["weight_map"])
    return out


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------
# Synthetic images


def synth_photo(w, h, seed, noise, shapes=7, lines=4):
    """Smooth two-colour gradient + a few shapes and thin lines, lightly blurred, plus grain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u = xx / max(w - 1, 1)
    v = yy / max(h - 1, 1)
    top, bottom = rng.uniform(30, 230, 3), rng.uniform(30, 230, 3)
    img = top * (1 - v[..., None]) + bottom * v[..., None]
    wave = np.sin(2 * np.pi * (rng.uniform(0.5, 2.0) * u + 0.7 * v + rng.uniform()))
    img += 30.0 * wave[..., None] * rng.uniform(-1, 1, 3)
    pil = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for i in range(shapes):
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, x1 = sorted(rng.uniform(-0.1, 1.1, 2) * w)
        y0, y1 = sorted(rng.uniform(-0.1, 1.1, 2) * h)
        kind = i % 3
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=col)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=col)
        else:
            pts = [tuple(p) for p in (rng.uniform(0, 1, (3, 2)) * [w, h])]
            draw.polygon(pts, fill=col)
    for _ in range(lines):
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, x1 = rng.uniform(0, w, 2)
        draw.line([(x0, 0), (x1, h - 1)], fill=col, width=1)
    pil = pil.filter(ImageFilter.GaussianBlur(radius=max(w, h) / 500.0))
    arr = np.asarray(pil).astype(np.float64)
    if noise > 0:
        arr += rng.normal(0.0, noise, arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def write_images(img_dir):
    img_dir.mkdir(parents=True, exist_ok=True)
    for p in img_dir.iterdir():
        p.unlink()
    seed = iter(range(IMAGE_SEED, IMAGE_SEED + 1000))

    # Inputs of the end-to-end cases.
    synth_photo(640, 480, next(seed), 0.8).save(img_dir / "landscape.jpg", quality=90, subsampling=2)
    synth_photo(480, 640, next(seed), 0.0).save(img_dir / "portrait.png", optimize=True)
    synth_photo(300, 300, next(seed), 0.0).save(img_dir / "square.png", optimize=True)
    synth_photo(20, 14, next(seed), 0.0, shapes=3, lines=1).save(img_dir / "tiny.png", optimize=True)
    synth_photo(1000, 60, next(seed), 0.0, shapes=5, lines=2).save(img_dir / "wide.png", optimize=True)

    # Decoder edge cases: JPEG baseline/progressive x chroma subsampling (odd sizes force partial
    # MCUs), EXIF orientation (the reference ignores it), grey, palette, alpha, WebP, GIF, BMP.
    small = synth_photo(97, 61, next(seed), 3.0)
    for kind, name, sub in (("baseline", "444", 0), ("baseline", "422", 1), ("baseline", "420", 2),
                            ("progressive", "444", 0), ("progressive", "420", 2)):
        small.save(img_dir / f"jpeg_{kind}_{name}_97x61.jpg", quality=92, subsampling=sub,
                   progressive=kind == "progressive")
    synth_photo(321, 241, next(seed), 0.5).save(
        img_dir / "jpeg_progressive_420_321x241.jpg", quality=85, subsampling=2, progressive=True
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display. Image.open + convert does NOT apply it.
    synth_photo(97, 61, next(seed), 2.0).save(img_dir / "jpeg_exif_orientation6.jpg", quality=90, exif=exif.tobytes())
    grey = synth_photo(97, 61, next(seed), 2.0).convert("L")
    grey.save(img_dir / "grey.jpg", quality=90)
    grey.save(img_dir / "grey.png")
    synth_photo(97, 61, next(seed), 0.0).quantize(colors=48).save(img_dir / "palette.png")
    rgba = synth_photo(97, 61, next(seed), 2.0).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 97).astype(np.uint8), (61, 1))
    alpha[:, :12] = 0  # fully transparent columns that still carry colour
    rgba.putalpha(Image.fromarray(alpha, "L"))
    rgba.save(img_dir / "rgba.png")
    synth_photo(97, 61, next(seed), 0.0).save(img_dir / "lossless.webp", lossless=True)
    synth_photo(97, 61, next(seed), 2.0).save(img_dir / "lossy.webp", quality=80)
    f0 = synth_photo(97, 61, next(seed), 0.0).quantize(colors=64)
    f1 = synth_photo(97, 61, next(seed), 0.0).quantize(colors=64)
    f0.save(img_dir / "anim.gif", save_all=True, append_images=[f1], duration=100, loop=0)
    synth_photo(97, 61, next(seed), 2.0).save(img_dir / "rgb24.bmp")


def write_decoded(img_dir, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(img_dir.iterdir()):
        with Image.open(p) as im:
            im.convert("RGB").save(out_dir / f"{p.name}.png", optimize=True)


# ------------------------------------------------------------------------------------------------
# Reference image processor (spec §2; same library calls as Phi3VImageProcessor.preprocess)


def pad_336(img):
    w, h = img.size
    tar = int(np.ceil(h / 336) * 336)
    top = int((tar - h) / 2)
    bottom = tar - h - top
    return torchvision.transforms.functional.pad(img, [0, top, 0, bottom], fill=[255, 255, 255])


def hd_transform(img, hd_num):
    w, h = img.size
    transposed = w < h
    if transposed:
        img = img.transpose(Image.TRANSPOSE)
        w, h = img.size
    ratio = w / h
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = torchvision.transforms.functional.resize(img, [new_h, new_w])
    img = pad_336(img)
    if transposed:
        img = img.transpose(Image.TRANSPOSE)
    return img


def to_normalized_tensor():
    return torchvision.transforms.Compose(
        [torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    )


def preprocess(images, num_crops):
    """-> pixel_values [n, num_crops+1, 3, 336, 336], image_sizes [n, 2] (H, W), num_img_tokens, HD PILs."""
    images = [im.convert("RGB") for im in images]  # convert_to_rgb, then convert('RGB') again
    images = [im.convert("RGB") for im in images]
    hd_pils = [hd_transform(im, num_crops) for im in images]
    norm = to_normalized_tensor()
    hd = [norm(im) for im in hd_pils]
    global_views = [F.interpolate(t.unsqueeze(0).float(), size=(336, 336), mode="bicubic").to(t.dtype) for t in hd]
    shapes = [[t.size(1), t.size(2)] for t in hd]
    num_tokens = [int((h // 336 * w // 336 + 1) * 144 + 1 + (h // 336 + 1) * 12) for h, w in shapes]
    per_image = []
    for t, g, (h, w) in zip(hd, global_views, shapes):
        crops = t.reshape(1, 3, h // 336, 336, w // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336)
        x = torch.cat([g, crops], dim=0)
        if x.shape[0] < num_crops + 1:
            x = torch.cat([x, torch.zeros(num_crops + 1 - x.shape[0], 3, 336, 336, dtype=x.dtype)], dim=0)
        per_image.append(x)
    pixel_values = torch.stack(per_image, dim=0)
    image_sizes = torch.tensor(shapes, dtype=torch.long)
    return pixel_values, image_sizes, num_tokens, hd_pils


def tokenize_prompt(tokenizer, text, num_img_tokens):
    """Phi3VProcessor._convert_images_texts_to_inputs (spec §3.2)."""
    if not num_img_tokens:
        return tokenizer(text).input_ids
    chunks = [tokenizer(c).input_ids for c in re.split(IMAGE_TAG, text)]
    ids = [int(s.split("|")[1].split("_")[-1]) for s in re.findall(IMAGE_TAG, text)]
    assert sorted(set(ids)) == list(range(1, len(set(ids)) + 1)) and len(set(ids)) == len(num_img_tokens)
    pads = [[-i] * num_img_tokens[i - 1] for i in ids]
    out = []
    for k, chunk in enumerate(chunks):
        out += chunk
        if k < len(pads):
            out += pads[k]
    return out


# ------------------------------------------------------------------------------------------------
# Reference model


def clip_model(w):
    cfg = CLIPVisionConfig(
        hidden_size=CLIP_HIDDEN,
        intermediate_size=CLIP_INTERMEDIATE,
        num_hidden_layers=CLIP_LAYERS,
        num_attention_heads=CLIP_HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        hidden_act="quick_gelu",
        layer_norm_eps=CLIP_EPS,
        attention_dropout=0.0,
        dropout=0.0,
    )
    model = CLIPVisionModel(cfg)
    prefix = "model.vision_embed_tokens.img_processor."
    sd = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
    model.load_state_dict(sd, strict=True)
    return model.eval()


def merge_2x2(feat, h_crop, w_crop):
    """[n*h_crop*w_crop, 576, C] -> [n, h_crop*12, w_crop*12, 4C] (spec §4.2-4.3)."""
    n_all, length, c = feat.shape
    g = int(length**0.5)
    n = n_all // (h_crop * w_crop)
    x = feat.reshape(n_all, g, g, c).reshape(n_all, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(n_all, -1, 4 * c)  # (N, 144, 4C)
    x = x.reshape(n, h_crop, w_crop, g // 2, g // 2, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h_crop * g // 2, w_crop * g // 2, 4 * c)


def add_newline(x, sub_gn):
    """[n, h, w, D] -> [n, h*(w+1), D]: sub_GN after every row (spec §4.4)."""
    n, h, _, d = x.shape
    return torch.cat([x, sub_gn.expand(n, h, -1, -1)], dim=2).reshape(n, -1, d)


def image_embeddings(w, clip, pixel_values, image_sizes):
    """-> image_embeds [T, HIDDEN] in sequence order, CLIP hidden_states[-2] of all crops."""
    v = "model.vision_embed_tokens."
    n_img, n_crops = pixel_values.shape[:2]
    out = clip(pixel_values.flatten(0, 1), output_hidden_states=True)
    hidden = out.hidden_states[-2]  # [n_img*n_crops, 577, C], CLS first
    feat = hidden[:, 1:].reshape(n_img, n_crops, GRID * GRID, CLIP_HIDDEN)
    glb = add_newline(merge_2x2(feat[:, 0], 1, 1), w[v + "sub_GN"])
    seq = []
    for i, (h, wd) in enumerate(image_sizes.tolist()):
        hc, wc = h // 336, wd // 336
        sub = add_newline(merge_2x2(feat[i, 1 : 1 + hc * wc], hc, wc), w[v + "sub_GN"])
        seq += [sub.squeeze(0), w[v + "glb_GN"].squeeze(0), glb[i]]
    x = torch.cat(seq, dim=0)
    x = F.linear(x, w[v + "img_projection.0.weight"], w[v + "img_projection.0.bias"])
    x = F.gelu(x)  # exact erf GELU (nn.GELU default)
    x = F.linear(x, w[v + "img_projection.2.weight"], w[v + "img_projection.2.bias"])
    return x, hidden


class Phi3Decoder:
    """Eager Phi-3 decoder restated from modeling_phi3_v.py (Phi-3-vision remote code), f32."""

    def __init__(self, w, cfg):
        self.w = w
        self.short = torch.tensor(cfg["rope_scaling"]["short_factor"], dtype=torch.float32)
        self.long = torch.tensor(cfg["rope_scaling"]["long_factor"], dtype=torch.float32)
        scale = cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]
        self.mscale = math.sqrt(1 + math.log(scale) / math.log(cfg["original_max_position_embeddings"]))
        self.orig = cfg["original_max_position_embeddings"]
        self.calls_long = []  # per forward call: did it use the long factors?

    def rms_norm(self, x, name):
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + RMS_EPS)
        return self.w[name + ".weight"] * x

    def rope(self, position_ids):
        seq_len = torch.max(position_ids) + 1
        use_long = bool(seq_len > self.orig)
        self.calls_long.append(use_long)
        ext = self.long if use_long else self.short
        inv_freq_shape = torch.arange(0, HEAD_DIM, 2, dtype=torch.int64).float() / HEAD_DIM
        inv_freq = 1.0 / (ext * ROPE_THETA**inv_freq_shape)
        inv_freq_expanded = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv_freq_expanded.float() @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.mscale, emb.sin() * self.mscale

    @staticmethod
    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)

    def forward(self, embeds, position_ids, cache):
        """embeds [1, L, D], position_ids [1, L], cache: list of (k, v) per layer or None."""
        b, q_len, _ = embeds.shape
        past = 0 if cache is None else cache[0][0].shape[2]
        kv_len = past + q_len
        # _prepare_4d_causal_attention_mask: finfo.min above the diagonal (sliding window 4096 is
        # never reached here).
        mask = torch.full((q_len, q_len), torch.finfo(torch.float32).min)
        cond = torch.arange(q_len)
        mask.masked_fill_(cond < (cond + 1).view(q_len, 1), 0)
        mask = torch.cat([torch.zeros(q_len, past), mask], dim=-1)[None, None]
        cos, sin = self.rope(position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        new_cache = []
        h = embeds
        for i in range(N_LAYERS):
            p = f"model.layers.{i}."
            residual = h
            x = self.rms_norm(h, p + "input_layernorm")
            qkv = F.linear(x, self.w[p + "self_attn.qkv_proj.weight"])
            q = qkv[..., :HIDDEN].view(b, q_len, N_HEADS, HEAD_DIM).transpose(1, 2)
            k = qkv[..., HIDDEN : 2 * HIDDEN].view(b, q_len, N_HEADS, HEAD_DIM).transpose(1, 2)
            v = qkv[..., 2 * HIDDEN :].view(b, q_len, N_HEADS, HEAD_DIM).transpose(1, 2)
            q = (q * cos) + (self.rotate_half(q) * sin)
            k = (k * cos) + (self.rotate_half(k) * sin)
            if cache is not None:
                k = torch.cat([cache[i][0], k], dim=-2)
                v = torch.cat([cache[i][1], v], dim=-2)
            new_cache.append((k, v))
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HEAD_DIM)
            assert scores.shape == (b, N_HEADS, q_len, kv_len)
            scores = scores + mask
            probs = F.softmax(scores, dim=-1, dtype=torch.float32)
            attn = torch.matmul(probs, v).transpose(1, 2).contiguous().reshape(b, q_len, HIDDEN)
            h = residual + F.linear(attn, self.w[p + "self_attn.o_proj.weight"])
            residual = h
            x = self.rms_norm(h, p + "post_attention_layernorm")
            gate, up = F.linear(x, self.w[p + "mlp.gate_up_proj.weight"]).chunk(2, dim=-1)
            h = residual + F.linear(up * F.silu(gate), self.w[p + "mlp.down_proj.weight"])
        h = self.rms_norm(h, "model.norm")
        logits = F.linear(h, self.w["lm_head.weight"]).float()
        return logits, new_cache


def text_embeddings(w, input_ids, image_embeds):
    """embed_tokens(clamp(ids, 0, V)), image rows overwritten in sequence order (spec §4.7-4.8)."""
    ids = input_ids.clone()
    positions = torch.nonzero((ids < 0) & (ids > -int(1e9)), as_tuple=True)
    e = F.embedding(ids.clamp_min(0).clamp_max(VOCAB), w["model.embed_tokens.weight"])
    if image_embeds is not None:
        assert positions[0].numel() == image_embeds.shape[0]
        e = e.index_put(positions, image_embeds, accumulate=False)
    return e


def greedy(decoder, w, embeds, max_new_tokens):
    """Prefill, then one token per call with the KV cache and explicit position ids."""
    seq = embeds.shape[1]
    logits, cache = decoder.forward(embeds, torch.arange(seq)[None], None)
    prefill_logits = logits[0, -1].clone()
    cur = prefill_logits
    tokens, margins = [], []
    for step in range(max_new_tokens):
        top = torch.topk(cur, 2)
        tok = int(torch.argmax(cur))
        assert tok == int(top.indices[0])
        tokens.append(tok)
        margins.append(float(top.values[0] - top.values[1]))
        if step == max_new_tokens - 1:
            break
        e = F.embedding(torch.tensor([[tok]]), w["model.embed_tokens.weight"])
        logits, cache = decoder.forward(e, torch.tensor([[seq + step]]), cache)
        cur = logits[0, -1]
    return prefill_logits, tokens, margins


# ------------------------------------------------------------------------------------------------
# Cases


def chat(user_text):
    return f"<|user|>\n{user_text}<|end|>\n<|assistant|>\n"


def filler_text(prefix_tokens, lo, hi):
    """Deterministic prose whose prompt lands in [lo, hi] tokens."""
    words = (
        "the river bends past old mills while lanterns glow over quiet streets and a small "
        "boat drifts toward the harbour where gulls circle above the nets drying in the sun"
    ).split()
    text, i = "", 0
    while True:
        word = words[i % len(words)] + (f" {i}" if i % 11 == 10 else "")
        candidate = f"{text} {word}" if text else word
        n = prefix_tokens(candidate)
        if n > hi:
            raise RuntimeError("filler overshot")
        text = candidate
        i += 1
        if n >= lo:
            return text


def build_cases(tokenizer):
    def case(name, images, num_crops, question, max_new_tokens=8):
        tags = "".join(f"<|image_{k + 1}|>\n" for k in range(len(images)))
        return dict(name=name, images=images, num_crops=num_crops, prompt=chat(tags + question),
                    max_new_tokens=max_new_tokens)

    cases = [
        case("landscape_nc4", ["landscape.jpg"], 4, "What is shown in this image?"),  # spec §11 prompt
        case("portrait_nc4", ["portrait.png"], 4, "Describe the colours in this picture."),
        case("square_nc1", ["square.png"], 1, "What shapes do you see?"),
        case("tiny_nc16", ["tiny.png"], 16, "Is this image small?"),
        case("wide_nc16", ["wide.png"], 16, "Read the banner from left to right."),
        case("two_images", ["landscape.jpg", "portrait.png"], 4, "What is different between the two images?"),
    ]
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello in German."},
        {"role": "assistant", "content": "Hallo! Grüße aus Köln."},
        {"role": "user", "content": "Now explain the emoji 🙂 in two words, and translate 日本."},
    ]
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if templated.endswith("<|endoftext|>"):  # sample_inference.py strips it ("used for training")
        templated = templated[: -len("<|endoftext|>")]
    cases.append(dict(name="text_only", images=[], num_crops=4, prompt=templated, messages=messages,
                      templated=templated, max_new_tokens=8))

    # 757 image tokens + text so that the prompt is 1010..1020 tokens: prefill uses the short
    # factors, and decoding crosses 1024 (seq_len = max(position_ids)+1 > 1024 -> long factors).
    def n_tokens(text):
        return len(tokenize_prompt(tokenizer, chat(f"<|image_1|>\n{text}"), [757]))

    cases.append(case("rope_cross", ["landscape.jpg"], 4, filler_text(n_tokens, 1012, 1018), max_new_tokens=24))
    return cases


def prepare_case(case, w, clip, tokenizer, img_dir, out_dir, stored):
    """Run the image and prompt part of one case; returns what the decoder step needs.

    Image goldens (hd_0.png, global_view_0, clip_hidden, image_embeds) are stored once per
    (image file, num_crops), in the first case that uses that image as its first image. A later
    case whose images all have stored goldens (two_images, rope_cross) recomputes them, asserts
    they are bit-identical and omits them; case.json "image_goldens_from" names, per image, the case
    holding them (as its image 0). inputs_embeds is not stored: it is exactly embed_tokens rows
    (bf16 -> f32) at clamp(input_ids, 0) with the image rows replaced, in sequence order, by the
    concatenated image_embeds. Both choices keep fixtures/ under 30 MiB.
    """
    case_dir = out_dir / case["name"]
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    tensors = {}
    meta = {k: case[k] for k in ("images", "num_crops", "prompt", "max_new_tokens")}
    for k in ("messages", "templated"):
        if k in case:
            meta[k] = case[k]
    image_embeds = None
    num_tokens = []
    if case["images"]:
        pils = []
        for name in case["images"]:
            with Image.open(img_dir / name) as im:
                im.load()
                pils.append(im.copy())
        pixel_values, image_sizes, num_tokens, hd_pils = preprocess(pils, case["num_crops"])
        with torch.no_grad():
            image_embeds, hidden = image_embeddings(w, clip, pixel_values, image_sizes)
        bounds = np.cumsum([0] + num_tokens)
        per_image = []
        for k, hd in enumerate(hd_pils):
            per_image.append({
                "hd": np.asarray(hd).copy(),
                "global_view_0": pixel_values[k, 0].contiguous(),
                "clip_hidden": hidden[k * pixel_values.shape[1] : k * pixel_values.shape[1] + 2].contiguous(),
                "image_embeds": image_embeds[bounds[k] : bounds[k + 1]].contiguous(),
            })
        keys = [(name, case["num_crops"]) for name in case["images"]]
        if all(key in stored for key in keys):
            for key, mine in zip(keys, per_image):
                src = stored[key]
                assert np.array_equal(src["hd"], mine["hd"]), key
                for t in ("global_view_0", "clip_hidden", "image_embeds"):
                    assert torch.equal(src[t], mine[t]), (case["name"], key, t)
        else:
            copies = []
            for k, hd in enumerate(hd_pils):
                hd.save(case_dir / f"hd_{k}.png", optimize=True)
                if tuple(image_sizes[k].tolist()) == (336, 336):
                    # Bicubic to the same size is an exact copy of the normalised HD image, i.e. of
                    # the one sub-crop: checked here, so the tests rebuild it from hd_k.png and
                    # norm_table instead of storing 1.35 MB (keeps fixtures/ under 30 MB).
                    assert torch.equal(per_image[k]["global_view_0"], pixel_values[k, 1]), case["name"]
                    copies.append(True)
                else:
                    tensors[f"global_view_{k}"] = per_image[k]["global_view_0"]
                    copies.append(False)
            meta["global_view_is_hd_copy"] = copies
            tensors["clip_hidden"] = hidden[0:2].contiguous()
            tensors["image_embeds"] = image_embeds.contiguous()
            if keys[0] not in stored:
                stored[keys[0]] = dict(per_image[0], case=case["name"])
        meta["image_goldens_from"] = [stored[key]["case"] for key in keys]
        tensors["image_sizes"] = image_sizes
        tensors["num_img_tokens"] = torch.tensor(num_tokens, dtype=torch.long)
    ids = tokenize_prompt(tokenizer, case["prompt"], num_tokens)
    input_ids = torch.tensor(ids, dtype=torch.long)
    tensors["input_ids"] = input_ids
    with torch.no_grad():
        embeds = text_embeddings(w, input_ids[None], image_embeds).contiguous()
    return dict(case=case, case_dir=case_dir, tensors=tensors, meta=meta, embeds=embeds, ids=ids,
                num_tokens=num_tokens)


def transformers_decoder(prepared, ckpt):
    """Decoder goldens from transformers 4.41.2's Phi3ForCausalLM, run by phi3_reference.py in its
    own process (this one has transformers 4.40.2 imported). -> {case: {logits, generated_ids,
    generated_margins, rope_long_per_call}}, plus the transformers version and module it ran."""
    with tempfile.TemporaryDirectory(prefix="phi3-ref-") as tmp:
        inputs, outputs = Path(tmp) / "inputs.safetensors", Path(tmp) / "outputs.safetensors"
        cases = [{"name": p["case"]["name"], "max_new_tokens": p["case"]["max_new_tokens"]} for p in prepared]
        save_file({f"{p['case']['name']}.inputs_embeds": p["embeds"] for p in prepared}, str(inputs),
                  metadata={"cases": json.dumps(cases)})
        cmd = [sys.executable, "-I", str(PHI3_REFERENCE), "--ckpt", str(ckpt.resolve()),
               "--inputs", str(inputs), "--out", str(outputs)]
        subprocess.run(cmd, check=True)
        with safe_open(str(outputs), framework="pt") as f:
            info = f.metadata()
        flat = load_file(str(outputs))
    out = {}
    for c in cases:
        n = c["name"]
        out[n] = {k: flat[f"{n}.{k}"] for k in ("logits", "generated_ids", "generated_margins", "rope_long_per_call")}
    assert len(flat) == 4 * len(cases)
    return out, info


def cross_check(name, hf, hand_logits, hand_ids, hand_margins, hand_long):
    """The hand-written Phi3Decoder against transformers' Phi3ForCausalLM."""
    ref = hf["logits"].double()
    rel = float((hand_logits.double() - ref).norm() / ref.norm())
    assert rel < CROSS_CHECK_REL_L2, f"{name}: hand-written vs transformers logits rel L2 {rel:.3g}"
    ids, margins = hf["generated_ids"].tolist(), hf["generated_margins"].tolist()
    assert len(hand_ids) == len(ids)
    compared = 0
    for i, (a, b, m) in enumerate(zip(hand_ids, ids, margins)):
        if m <= CROSS_CHECK_MARGIN:
            break  # a near-tie may legitimately flip; later tokens then see different prefixes
        assert a == b, f"{name}: greedy token {i}: hand-written {a}, transformers {b} (margin {m:.3g})"
        compared += 1
    # The factor set depends only on positions, so it must agree whatever the tokens.
    assert hf["rope_long_per_call"].bool().tolist() == hand_long, name
    dm = max(abs(a - b) for a, b in zip(hand_margins[:compared], margins[:compared])) if compared else 0.0
    return dict(rel_l2=rel, ids_compared=compared, max_margin_diff=dm)


def finish_case(p, hf):
    """Write golden/<case>/: the decoder goldens are transformers' (hf)."""
    tensors, meta = p["tensors"], p["meta"]
    tensors["logits"] = hf["logits"].contiguous()
    tensors["generated_ids"] = hf["generated_ids"].contiguous()
    tensors["generated_margins"] = hf["generated_margins"].contiguous()
    assert tensors["generated_ids"].numel() == meta["max_new_tokens"]
    save_file(tensors, str(p["case_dir"] / "tensors.safetensors"))
    # Informational: which LongRoPE factor set each forward call used (prefill first).
    longs = hf["rope_long_per_call"].bool().tolist()
    meta["rope_long_per_call"] = longs
    write_json(p["case_dir"] / "case.json", meta)
    return dict(name=p["case"]["name"], seq=len(p["ids"]), img_tokens=sum(p["num_tokens"]),
                min_margin=float(hf["generated_margins"].min()), prefill_long=longs[0],
                first_long_call=next((i for i, x in enumerate(longs) if x), None), ids=p["ids"],
                num_tokens=p["num_tokens"])


# ------------------------------------------------------------------------------------------------
# Self-checks against the spec


def check_worked_examples():
    """Spec §2.7 table: (W, H, num_crops) -> HD size, white padding (before, after), tokens."""
    table = [
        (336, 336, 16, 1344, 1344, (0, 0), 2509), (336, 336, 4, 672, 672, (0, 0), 757),
        (640, 480, 16, 1344, 1008, (0, 0), 1921), (640, 480, 4, 672, 672, (84, 84), 757),
        (480, 640, 16, 1008, 1344, (0, 0), 1933), (480, 640, 4, 672, 672, (84, 84), 757),
        (1280, 720, 16, 1680, 1008, (31, 32), 2353), (1280, 720, 4, 672, 672, (147, 147), 757),
        (50, 8000, 16, 336, 5376, (151, 152), 2653),
    ]
    for w, h, nc, hw, hh, (pad0, pad1), tokens in table:
        _, sizes, n, hd = preprocess([Image.new("RGB", (w, h), (10, 20, 30))], nc)
        assert hd[0].size == (hw, hh) and sizes.tolist() == [[hh, hw]] and n == [tokens], (w, h, nc, hd[0].size, n)
        white = (np.asarray(hd[0]) == 255).all(axis=2)
        lines = white.all(axis=1) if w >= h else white.all(axis=0)  # padded rows (landscape) / columns
        assert (lines.argmin(), lines[::-1].argmin()) == (pad0, pad1), (w, h, nc)
    # Spec §2.3: torchvision's resize of a PIL image is PIL's antialiased bilinear resize.
    img = synth_photo(97, 61, 7, 3.0)
    for size in ((40, 23), (300, 200)):
        tv = torchvision.transforms.functional.resize(img, [size[1], size[0]])
        assert np.array_equal(np.asarray(tv), np.asarray(img.resize(size, Image.BILINEAR)))


def check_canonical_prompt(res):
    """Spec §11: the canonical single-image prompt."""
    n = res["num_tokens"][0]
    want = [1, 32010, 29871, 13] + [-1] * n + [1, 29871, 13, 5618, 338, 4318, 297, 445, 1967, 29973,
                                                32007, 29871, 13, 32001]
    assert res["ids"] == want, res["ids"][:8]
    assert n == 757


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="fixtures directory")
    ap.add_argument("--tokenizer", type=Path, required=True, help="directory with the real tokenizer files")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = args.out
    tok_dir = args.tokenizer
    if not (tok_dir / "tokenizer.json").is_file():
        sys.exit(f"tokenizer.json not found in {tok_dir}")

    ckpt = out / "tiny-phi3v"
    golden = out / "golden"
    for d in (ckpt, golden):  # fixtures/README.md and anything else at the top level is kept
        if d.exists():
            shutil.rmtree(d)
    write_checkpoint(ckpt, make_weights(), tok_dir)
    w = load_checkpoint_f32(ckpt)

    img_dir = out / "images"
    write_images(img_dir)
    write_decoded(img_dir, golden / "decoded")

    ramp = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2), "RGB")
    table = to_normalized_tensor()(ramp).reshape(3, 256).contiguous()
    save_file({"table": table}, str(golden / "norm_table.safetensors"))

    check_worked_examples()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    clip = clip_model(w)
    stored = {}
    prepared = [prepare_case(case, w, clip, tokenizer, img_dir, golden, stored) for case in build_cases(tokenizer)]

    # Decoder goldens: transformers' Phi3ForCausalLM (4.41.2, separate process). The hand-written
    # Phi3Decoder (a restatement of the Phi-3-vision remote code) is kept as a cross-check.
    hf, hf_info = transformers_decoder(prepared, ckpt)
    decoder = Phi3Decoder(w, model_config())
    results, checks = [], {}
    for p in prepared:
        name = p["case"]["name"]
        with torch.no_grad():
            decoder.calls_long = []
            logits, gen, margins = greedy(decoder, w, p["embeds"], p["case"]["max_new_tokens"])
        checks[name] = cross_check(name, hf[name], logits, gen, margins, decoder.calls_long)
        res = finish_case(p, hf[name])
        if name == "landscape_nc4":
            check_canonical_prompt(res)
        results.append(res)

    by = {r["name"]: r for r in results}
    assert by["wide_nc16"]["prefill_long"] and by["wide_nc16"]["seq"] > ORIG_MAX_POS
    rc = by["rope_cross"]
    assert 1010 <= rc["seq"] <= 1020 and not rc["prefill_long"] and rc["first_long_call"] is not None

    print(f"decoder goldens: transformers {hf_info['transformers_version']} Phi3ForCausalLM "
          f"({hf_info['module']}); cross-check: hand-written Phi3Decoder")
    print(f"{'case':<16}{'seq':>6}{'img tok':>9}{'min margin':>12}  {'rope (prefill / 1st long)':<27}"
          f"{'rel L2 hand/hf':>15}{'ids equal':>11}{'max |dmargin|':>15}")
    for r in results:
        c = checks[r["name"]]
        rope = f"{'long' if r['prefill_long'] else 'short'} / {r['first_long_call']}"
        print(f"{r['name']:<16}{r['seq']:>6}{r['img_tokens']:>9}{r['min_margin']:>12.4g}  {rope:<27}"
              f"{c['rel_l2']:>15.3e}{c['ids_compared']:>7}/{len(hf[r['name']]['generated_ids']):<3}"
              f"{c['max_margin_diff']:>15.3e}")
    digest = hashlib.sha256()
    for p in sorted(q for d in (ckpt, img_dir, golden) for q in d.rglob("*")):
        if p.is_file():
            digest.update(p.relative_to(out).as_posix().encode() + b"\0" + p.read_bytes())
    print(f"fixtures sha256: {digest.hexdigest()}")


if __name__ == "__main__":
    main()

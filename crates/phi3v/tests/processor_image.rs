//! Image preprocessing properties that follow from the algorithms themselves (spec §2):
//! the worked-example table, resize and bicubic invariants, crop layout, zero padding,
//! normalisation and decoding errors.

use std::path::PathBuf;

use phi3v::processor::{
    bicubic_resize_chw, calc_num_image_tokens_from_image_size, decode_image, decode_image_bytes,
    hd_transform, hd_transform::hd_transform_size, normalize_table, num_image_tokens,
    resize_bilinear, to_tensor_normalize, ImageProcessor, RgbImage, CROP_SIZE, MAX_IMAGE_PIXELS,
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
};

/// A deterministic pseudo-random image (xorshift), never constant.
fn noise_image(w: usize, h: usize, seed: u64) -> RgbImage {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data = (0..w * h * 3)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect();
    RgbImage::new(w, h, data).unwrap()
}

// ------------------------------------------------------------------------------------------
// Spec §2.7 worked examples.

#[test]
fn worked_example_table() {
    // (input W, H, num_crops) -> resized (W, H) in the transposed frame when portrait,
    // padding (before, after), HD (W, H), grid (h_c, w_c), tokens.
    #[rustfmt::skip]
    let table = [
        ((336, 336), 16, (1344, 1344), (0, 0), (1344, 1344), (4, 4), 2509),
        ((336, 336), 4, (672, 672), (0, 0), (672, 672), (2, 2), 757),
        ((640, 480), 16, (1344, 1008), (0, 0), (1344, 1008), (3, 4), 1921),
        ((640, 480), 4, (672, 504), (84, 84), (672, 672), (2, 2), 757),
        ((480, 640), 16, (1344, 1008), (0, 0), (1008, 1344), (4, 3), 1933),
        ((480, 640), 4, (672, 504), (84, 84), (672, 672), (2, 2), 757),
        ((1280, 720), 16, (1680, 945), (31, 32), (1680, 1008), (3, 5), 2353),
        ((1280, 720), 4, (672, 378), (147, 147), (672, 672), (2, 2), 757),
        ((50, 8000), 16, (5376, 33), (151, 152), (336, 5376), (16, 1), 2653),
    ];
    for ((w, h), n, resized, pad, hd, grid, tokens) in table {
        let s = hd_transform_size(w, h, n).unwrap();
        assert_eq!(s.transposed, w < h, "{w}x{h}");
        assert_eq!(s.resized, resized, "{w}x{h} n={n}");
        assert_eq!((s.pad_top, s.pad_bottom), pad, "{w}x{h} n={n}");
        assert_eq!(s.hd, hd, "{w}x{h} n={n}");
        assert_eq!((hd.1 / 336, hd.0 / 336), grid);
        assert!(grid.0 * grid.1 <= n);
        assert_eq!(num_image_tokens(grid.0, grid.1), tokens);
        assert_eq!(
            calc_num_image_tokens_from_image_size(w, h, n).unwrap(),
            tokens,
            "{w}x{h} n={n}"
        );
    }
}

#[test]
fn worked_examples_through_process() {
    // The real pipeline on synthetic images of the table's sizes (cheap ones).
    let p4 = ImageProcessor::default().with_num_crops(4).unwrap();
    for ((w, h), hd, tokens) in [
        ((640, 480), (672, 672), 757),
        ((480, 640), (672, 672), 757),
        ((336, 336), (672, 672), 757),
    ] {
        let out = p4.process(&noise_image(w, h, 7)).unwrap();
        assert_eq!((out.hd.width, out.hd.height), hd);
        assert_eq!(out.image_size, [hd.1, hd.0]);
        assert_eq!(out.num_img_tokens, tokens);
        assert_eq!(out.pixel_values.len(), 5 * 3 * 336 * 336);
    }
    let p16 = ImageProcessor::default();
    let out = p16.process(&noise_image(50, 8000, 3)).unwrap();
    assert_eq!((out.hd.width, out.hd.height), (336, 5376));
    assert_eq!((out.h_c, out.w_c), (16, 1));
    assert_eq!(out.num_img_tokens, 2653);
    // Portrait padding is white and lands left (151 columns) and right (152 columns).
    for y in [0, 1000, 5375] {
        assert_eq!(out.hd.pixel(150, y), [255, 255, 255]);
        assert_eq!(out.hd.pixel(151 + 33, y), [255, 255, 255]);
        assert_eq!(out.hd.pixel(335, y), [255, 255, 255]);
    }
}

#[test]
fn too_elongated_is_an_error() {
    // 8000:1 gives new_h = int(5376 / 8000) = 0, which Pillow refuses to resize to.
    let e = hd_transform_size(8000, 1, 16).unwrap_err().to_string();
    assert!(e.contains("8000x1") && e.contains("too extreme"), "{e}");
    let e = ImageProcessor::default()
        .process(&RgbImage::filled(1, 8000, [0, 0, 0]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("too extreme"), "{e}");
}

#[test]
fn num_crops_validation() {
    let e = ImageProcessor::default()
        .with_num_crops(0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--num-crops"), "{e}");
    assert!(ImageProcessor::default().with_num_crops(1_000_000).is_err());
    let p = ImageProcessor::default().with_num_crops(1).unwrap();
    let out = p.process(&noise_image(30, 20, 1)).unwrap();
    assert_eq!((out.h_c, out.w_c, out.num_crops), (1, 1, 1));
}

// ------------------------------------------------------------------------------------------
// Resize (Pillow bilinear) properties.

#[test]
fn resize_identity_is_a_copy() {
    let img = noise_image(13, 9, 5);
    assert_eq!(resize_bilinear(&img, 13, 9).unwrap(), img);
}

#[test]
fn resize_constant_stays_constant() {
    // Each fixed-point weight set sums to 2^22 ± a few units; with the 2^21 rounding bias the
    // result of a constant input is that constant.
    for v in [0u8, 1, 127, 128, 254, 255] {
        let img = RgbImage::filled(17, 11, [v, 255 - v, v / 2]);
        for (w, h) in [(5, 3), (40, 29), (17, 30), (3, 11), (1, 1), (100, 2)] {
            let out = resize_bilinear(&img, w, h).unwrap();
            assert!(
                out.data.chunks(3).all(|p| p == [v, 255 - v, v / 2]),
                "{v}: 17x11 -> {w}x{h}"
            );
        }
    }
}

#[test]
fn resize_hand_computed_downscale() {
    // One row, 4 -> 2 pixels: scale = 2, filterscale = 2, support = 2.
    // Output 0: center = 0.5 * 2 = 1.0, xmin = (int)(1 - 2 + 0.5) = (int)(-0.5) = 0,
    // xmax = min((int)(1 + 2 + 0.5), 4) = 3, so taps x = 0, 1, 2 with
    // tri((x - 1 + 0.5) / 2) = 0.75, 0.75, 0.25; normalised by 1.75: 3/7, 3/7, 1/7.
    // Fixed point (22 bits): (int)(3/7 * 2^22 + 0.5) = 1797559, (int)(1/7 * 2^22 + 0.5) = 599186.
    // Pixels 0, 100, 200: acc = 2^21 + 0 * 1797559 + 100 * 1797559 + 200 * 599186
    //                        = 301,690,252; acc >> 22 = 71 (71.93 truncated).
    // Output 1: center = 3.0, xmin = (int)(1.5) = 1, xmax = min(5, 4) = 4: taps x = 1, 2, 3 with
    // tri((x - 3 + 0.5) / 2) = 0.25, 0.75, 0.75 -> 1/7, 3/7, 3/7.
    // Pixels 100, 200, 60: acc = 2^21 + 100 * 599186 + 200 * 1797559 + 60 * 1797559
    //                         = 529,381,092; acc >> 22 = 126 (126.21 truncated).
    let px = [0u8, 100, 200, 60];
    let img = RgbImage::new(4, 1, px.iter().flat_map(|&v| [v, v, v]).collect()).unwrap();
    let out = resize_bilinear(&img, 2, 1).unwrap();
    assert_eq!(out.data, vec![71, 71, 71, 126, 126, 126]);
}

#[test]
fn resize_hand_computed_upscale() {
    // One column, 2 -> 4 rows: scale = 0.5, filterscale = 1, support = 1; the horizontal
    // pass is skipped (width unchanged). Pixels 10, 50.
    // Output 0: center 0.25, xmin = (int)(-0.25) = 0, xmax = (int)(1.75) = 1: one tap, weight 1
    //   -> acc = 2^21 + 10 * 2^22 -> 10.
    // Output 1: center 0.75, xmin = (int)(0.25) = 0, xmax = (int)(2.25) = 2: weights
    //   tri(0 - 0.75 + 0.5) = 0.75, tri(1 - 0.75 + 0.5) = 0.25 -> 3145728, 1048576;
    //   acc = 2^21 + 10 * 3145728 + 50 * 1048576 = 85,983,232 = 20.5 * 2^22 -> 20.
    // Output 2: center 1.25, taps 0, 1 with weights 0.25, 0.75 -> 40 * 2^22 + 2^21 -> 40.
    // Output 3: center 1.75, xmin = (int)(1.25) = 1, xmax = min(3, 2) = 2: one tap -> 50.
    let img = RgbImage::new(1, 2, vec![10, 10, 10, 50, 50, 50]).unwrap();
    let out = resize_bilinear(&img, 1, 4).unwrap();
    let col: Vec<u8> = out.data.chunks(3).map(|p| p[0]).collect();
    assert_eq!(col, vec![10, 20, 40, 50]);
}

#[test]
fn resize_zero_size_is_an_error() {
    let img = noise_image(4, 4, 1);
    assert!(resize_bilinear(&img, 0, 4).is_err());
    assert!(resize_bilinear(&img, 4, 0).is_err());
}

// ------------------------------------------------------------------------------------------
// Normalisation, bicubic, crops.

#[test]
fn normalisation_formula() {
    let t = normalize_table(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD);
    for c in 0..3 {
        for v in [0usize, 1, 128, 254, 255] {
            let x = v as f32 / 255.0;
            assert_eq!(
                t[c][v].to_bits(),
                ((x - OPENAI_CLIP_MEAN[c]) / OPENAI_CLIP_STD[c]).to_bits()
            );
        }
    }
    // White padding becomes (1 - mean) / std ≈ (1.9303, 2.0749, 2.1459) (spec §2.4).
    for (c, want) in [1.9303f32, 2.0749, 2.1459].into_iter().enumerate() {
        assert!((t[c][255] - want).abs() < 1e-4, "{c}: {}", t[c][255]);
    }
    let img = RgbImage::new(2, 1, vec![0, 128, 255, 10, 20, 30]).unwrap();
    let chw = to_tensor_normalize(&img, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD);
    assert_eq!(
        chw,
        vec![t[0][0], t[0][10], t[1][128], t[1][20], t[2][255], t[2][30]]
    );
}

#[test]
fn bicubic_identity_is_exact_copy() {
    let src: Vec<f32> = (0..3 * 7 * 5)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
        .collect();
    let out = bicubic_resize_chw(&src, 3, 7, 5, 7, 5).unwrap();
    assert_eq!(
        src.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn bicubic_integer_downscale() {
    // in = 3 * out: t = 0, weights [0, 1, 0, 0]: samples source pixel 3*i + 1 exactly.
    let (h, w) = (9, 6);
    let src: Vec<f32> = (0..h * w).map(|i| i as f32 * 0.5 - 7.0).collect();
    let out = bicubic_resize_chw(&src, 1, h, w, 3, 2).unwrap();
    for oy in 0..3 {
        for ox in 0..2 {
            assert_eq!(out[oy * 2 + ox], src[(3 * oy + 1) * w + 3 * ox + 1]);
        }
    }
    // in = 2 * out: t = 0.5, weights [-0.09375, 0.59375, 0.59375, -0.09375]; a linear ramp
    // along x is reproduced exactly in the interior (the kernel reproduces linear functions).
    let src: Vec<f32> = (0..8).map(|x| x as f32).collect();
    let out = bicubic_resize_chw(&src, 1, 1, 8, 1, 4).unwrap();
    assert_eq!(out[1], 2.5);
    assert_eq!(out[2], 4.5);
    // At the left border the taps clamp: x = -1 reads pixel 0.
    assert_eq!(
        out[0],
        -0.09375 * 0.0 + 0.59375 * 0.0 + 0.59375 * 1.0 + -0.09375 * 2.0
    );
}

#[test]
fn bicubic_bad_sizes_are_errors() {
    assert!(bicubic_resize_chw(&[0.0; 10], 1, 3, 3, 2, 2).is_err());
    assert!(bicubic_resize_chw(&[], 0, 3, 3, 2, 2).is_err());
}

#[test]
fn crops_layout_and_zero_padding() {
    // 700x300 with 4 crops: ratio 2.33, scale 2 -> 672x288, padded to 672x336 -> grid 1x2.
    let p = ImageProcessor::default().with_num_crops(4).unwrap();
    let img = noise_image(700, 300, 11);
    let out = p.process(&img).unwrap();
    assert_eq!((out.h_c, out.w_c), (1, 2));
    assert_eq!(out.image_size, [336, 672]);
    let per = 3 * CROP_SIZE * CROP_SIZE;
    assert_eq!(out.pixel_values.len(), 5 * per);
    let norm = to_tensor_normalize(&out.hd, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD);
    let (h, w) = (out.hd.height, out.hd.width);
    for m in 0..2 {
        let (a, b) = (m / out.w_c, m % out.w_c);
        let crop = out.crop(m).unwrap();
        for c in 0..3 {
            for y in [0, 17, 335] {
                for x in [0, 200, 335] {
                    let want = norm[c * h * w + (a * 336 + y) * w + b * 336 + x];
                    assert_eq!(
                        crop[c * 336 * 336 + y * 336 + x],
                        want,
                        "crop {m} c{c} y{y} x{x}"
                    );
                }
            }
        }
    }
    assert!(out.crop(2).is_none());
    // Crops 2 and 3 of the 4 are zero tensors (zeros, not normalised white).
    assert!(out.pixel_values[3 * per..].iter().all(|&v| v == 0.0));
    // The global view is the bicubic of the whole normalised HD image.
    let global = bicubic_resize_chw(&norm, 3, h, w, 336, 336).unwrap();
    assert_eq!(out.global_view(), &global[..]);
    // Padding rows (24 above, 24 below the 288 image rows) are white.
    assert_eq!(out.hd.pixel(5, 0), [255, 255, 255]);
    assert_eq!(out.hd.pixel(5, 23), [255, 255, 255]);
    assert_eq!(out.hd.pixel(5, 24 + 288), [255, 255, 255]);
}

#[test]
fn crops_layout_2x2_grid_order() {
    // A 672x672 HD image whose quadrants have distinct colours: crop m = a * w_c + b.
    let mut hd = RgbImage::filled(672, 672, [0, 0, 0]);
    let colours = [[10u8, 0, 0], [0, 20, 0], [0, 0, 30], [40, 40, 40]];
    for y in 0..672 {
        for x in 0..672 {
            let q = (y / 336) * 2 + x / 336;
            let i = (y * 672 + x) * 3;
            hd.data[i..i + 3].copy_from_slice(&colours[q]);
        }
    }
    // 672x672 with num_crops 4 is already HD-sized: resize is the identity.
    let p = ImageProcessor::default().with_num_crops(4).unwrap();
    let out = p.process(&hd).unwrap();
    assert_eq!(out.hd, hd);
    let t = normalize_table(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD);
    for m in 0..4 {
        let crop = out.crop(m).unwrap();
        for c in 0..3 {
            let v = t[c][colours[m][c] as usize];
            assert!(
                crop[c * 336 * 336..(c + 1) * 336 * 336]
                    .iter()
                    .all(|&x| x == v),
                "crop {m} channel {c}"
            );
        }
    }
}

#[test]
fn hd_transform_upscales_small_images() {
    // Spec: a 100x100 image with 16 crops becomes 1344x1344.
    let out = hd_transform(&noise_image(100, 100, 2), 16).unwrap();
    assert_eq!((out.width, out.height), (1344, 1344));
}

#[test]
fn preprocessor_config_defaults_and_errors() {
    let dir = std::env::temp_dir().join(format!("phi3v-proc-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("preprocessor_config.json");

    std::fs::write(
        &path,
        r#"{"num_crops": 4, "image_processor_type": "Phi3VImageProcessor"}"#,
    )
    .unwrap();
    let p = ImageProcessor::from_preprocessor_config(&path).unwrap();
    assert_eq!(p.num_crops, 4);
    assert_eq!(p.image_mean, OPENAI_CLIP_MEAN);
    assert_eq!(p.image_std, OPENAI_CLIP_STD);

    std::fs::write(
        &path,
        r#"{"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.5, 0.5, 1]}"#,
    )
    .unwrap();
    let p = ImageProcessor::from_preprocessor_config(&path).unwrap();
    assert_eq!(p.num_crops, 16);
    assert_eq!(p.image_mean, OPENAI_CLIP_MEAN);
    assert_eq!(p.image_std, [0.5, 0.5, 1.0]);

    for bad in [
        r#"{"num_crops": 0}"#,
        r#"{"num_crops": -3}"#,
        r#"{"image_std": [1, 2]}"#,
        r#"{"image_std": [0, 1, 1]}"#,
        "[1, 2]",
        "not json",
    ] {
        std::fs::write(&path, bad).unwrap();
        let e = ImageProcessor::from_preprocessor_config(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("preprocessor_config.json"), "{bad}: {e}");
    }
    let e = ImageProcessor::from_preprocessor_config(&dir.join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

// ------------------------------------------------------------------------------------------
// Decoding errors: always an Err naming the file, never a panic.

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/pillow/decode")
            .join(name),
    )
    .unwrap()
}

#[test]
fn decode_errors_name_the_input() {
    let png = fixture("rgb8.png");
    let jpg = fixture("q90_420.jpg");
    let gif = fixture("simple.gif");
    let webp = fixture("lossless.webp");
    let bmp = fixture("rgb24.bmp");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.png", vec![]),
        ("garbage.bin", b"this is not an image at all".to_vec()),
        ("zeros.jpg", vec![0; 100]),
        ("truncated.png", png[..png.len() / 2].to_vec()),
        ("header_only.png", png[..30].to_vec()),
        ("truncated.jpg", jpg[..jpg.len() / 2].to_vec()),
        ("header_only.jpg", jpg[..20].to_vec()),
        ("magic_only.jpg", vec![0xFF, 0xD8, 0xFF]),
        ("truncated.gif", gif[..gif.len() - 12].to_vec()),
        ("header_only.gif", gif[..10].to_vec()),
        ("truncated.webp", webp[..webp.len() / 2].to_vec()),
        ("truncated.bmp", bmp[..bmp.len() / 2].to_vec()),
        ("bm_only.bmp", b"BM".to_vec()),
    ];
    for (name, bytes) in cases {
        match decode_image_bytes(&bytes, name) {
            Ok(img) => panic!("{name}: decoded {}x{}", img.width, img.height),
            Err(e) => assert!(e.to_string().contains(name), "{name}: {e}"),
        }
    }
    let missing = PathBuf::from("/definitely/not/here.png");
    let e = decode_image(&missing).unwrap_err().to_string();
    assert!(e.contains("/definitely/not/here.png"), "{e}");
}

#[test]
fn decompression_bomb_is_refused_before_decoding() {
    // A PNG header claiming 20000 x 10000 = 2e8 pixels (> 178,956,970).
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let ihdr: Vec<u8> = [
        &20000u32.to_be_bytes()[..],
        &10000u32.to_be_bytes()[..],
        &[8, 2, 0, 0, 0],
    ]
    .concat();
    png.extend(13u32.to_be_bytes());
    png.extend(b"IHDR");
    png.extend(&ihdr);
    let crc = crc32(&[b"IHDR".as_slice(), &ihdr].concat());
    png.extend(crc.to_be_bytes());
    // A token IDAT so the header parses; no pixel is ever decoded.
    let idat = [0x78u8, 0x9C, 0x03, 0x00];
    png.extend((idat.len() as u32).to_be_bytes());
    png.extend(b"IDAT");
    png.extend(idat);
    png.extend(crc32(&[b"IDAT".as_slice(), &idat].concat()).to_be_bytes());
    let e = decode_image_bytes(&png, "bomb.png")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bomb.png") && e.contains(&MAX_IMAGE_PIXELS.to_string()),
        "{e}"
    );

    // The same through a JPEG SOF: 65000 x 65000.
    let mut jpg = fixture("q90_420.jpg");
    let sof = jpg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline SOF0");
    jpg[sof + 5..sof + 7].copy_from_slice(&65000u16.to_be_bytes());
    jpg[sof + 7..sof + 9].copy_from_slice(&65000u16.to_be_bytes());
    let e = decode_image_bytes(&jpg, "bomb.jpg")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bomb.jpg") && e.contains("decompression bomb"),
        "{e}"
    );
}

#[test]
fn zero_sized_images_are_errors() {
    // GIF with a 0x0 screen and a 0x0 frame.
    let gif = b"GIF89a\x00\x00\x00\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff\x2c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x02\x4c\x01\x00\x3b";
    let e = decode_image_bytes(gif, "zero.gif").unwrap_err().to_string();
    assert!(e.contains("zero.gif"), "{e}");
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

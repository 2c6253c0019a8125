//! `clip-lens atlas` and `clip-lens atlas-merge` end to end on a tiny random model and a few
//! fixture images: the manifest's hashes, skipped files, and sharded runs against one run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use engine::assets::{self, AtlasBlock, Manifest};

fn clip_lens(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clip-lens")).args(args).output().expect("clip-lens runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run_ok(args: &[&str]) -> Output {
    let output = clip_lens(args);
    assert!(output.status.success(), "clip-lens {args:?} failed:\n{}", text(&output.stderr));
    output
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("clip-lens-atlas-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture_images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/images")
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A model, an image folder (eight fixture images, one in a subfolder, one broken file and one
/// file that is not an image), a small vocabulary and a small class list.
struct Inputs {
    dir: PathBuf,
    model: PathBuf,
    images: PathBuf,
    vocabulary: PathBuf,
    classes: PathBuf,
}

fn inputs(name: &str) -> Inputs {
    let dir = temp_dir(name);
    let model = dir.join("model");
    run_ok(&["random-model", "--preset", "tiny", "--seed", "5", "--out", s(&model)]);

    let images = dir.join("images");
    std::fs::create_dir_all(images.join("more")).unwrap();
    for name in ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rgb.png", "gray.png", "palette.png", "tall.png"] {
        std::fs::copy(fixture_images().join(name), images.join(name)).unwrap();
    }
    std::fs::copy(fixture_images().join("rgb.bmp"), images.join("more/rgb.BMP")).unwrap();
    std::fs::write(images.join("broken.jpg"), b"not a JPEG").unwrap();
    std::fs::write(images.join("notes.txt"), b"not an image").unwrap();

    let vocabulary = dir.join("vocabulary.txt");
    let words = [
        "cat", "dog", "car", "tree", "sky", "water", "red", "blue", "green", "house", "boat", "bird", "flower",
        "road", "snow", "sand", "cup", "coffee", "astronaut", "moon", "stone", "grass", "cloud", "light",
    ];
    std::fs::write(&vocabulary, words.join("\n") + "\n").unwrap();
    let classes = dir.join("classes.json");
    let json = serde_json::json!({
        "classes": ["tabby cat", "golden retriever", "sports car", "oak tree", "sailboat", "coffee mug",
                    "daisy", "space shuttle", "mountain", "beach", "lighthouse", "volcano"],
        "templates": ["a photo of a {}.", "a drawing of a {}.", "a close-up photo of the {}."],
        "source": "written for this test",
        "license": "none needed",
    });
    std::fs::write(&classes, json.to_string()).unwrap();
    Inputs { dir, model, images, vocabulary, classes }
}

/// Lists the options that every stage shares, with k top images.
fn common<'a>(inputs: &'a Inputs, k: &'a str) -> Vec<&'a str> {
    vec![
        "--model", s(&inputs.model), "--images", s(&inputs.images), "--layers", "1,2", "--k", k,
        "--terms", "4", "--vocabulary", s(&inputs.vocabulary), "--classes", s(&inputs.classes),
        "--batch", "3",
    ]
}

fn atlas(inputs: &Inputs, extra: &[&str]) -> Output {
    let mut args = vec!["atlas"];
    args.extend(common(inputs, "3"));
    args.extend(extra);
    run_ok(&args)
}

fn read_manifest(dir: &Path) -> Manifest {
    Manifest::parse(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn atlas_writes_verified_files() {
    let inputs = inputs("single");
    let out = inputs.dir.join("atlas");
    let output = atlas(&inputs, &["--out", s(&out)]);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("skipping broken.jpg"), "{stderr}");
    assert!(text(&output.stdout).contains("wrote the atlas"), "{}", text(&output.stdout));

    let manifest = read_manifest(&out);
    assert_eq!(manifest.format, "clip-lens-atlas");
    assert_eq!(manifest.layers(), vec![1, 2]);
    assert_eq!((manifest.k, manifest.m), (3, 4));
    assert_eq!(manifest.model.neurons, 128);
    assert_eq!(manifest.model.embed_dim, 24);
    assert_eq!(manifest.classes.templates, 3);
    assert_eq!(manifest.build.shards, 1);
    assert_eq!(manifest.images.listed, 9);
    assert_eq!(manifest.images.used, 8);
    assert_eq!(manifest.images.skipped.len(), 1);
    assert_eq!(manifest.images.skipped[0].path, "broken.jpg");

    // Every file on disk is listed, and every listed file matches its size and hash.
    let mut on_disk = Vec::new();
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            for inner in std::fs::read_dir(&path).unwrap() {
                on_disk.push(format!("{}/{}", path.file_name().unwrap().to_str().unwrap(), inner.unwrap().file_name().to_str().unwrap()));
            }
        } else if path.file_name().unwrap() != "manifest.json" {
            on_disk.push(path.file_name().unwrap().to_str().unwrap().to_string());
        }
    }
    on_disk.sort();
    let mut listed: Vec<String> = manifest.files.iter().map(|f| f.path.clone()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
    for file in &manifest.files {
        let bytes = std::fs::read(out.join(&file.path)).unwrap();
        assets::verify(file, &bytes).unwrap();
    }

    let images = assets::decode_lines(manifest.file("images.txt").unwrap(), &std::fs::read(out.join("images.txt")).unwrap()).unwrap();
    assert_eq!(
        images,
        ["astronaut.jpg", "broken.jpg", "chelsea.jpg", "coffee.jpg", "gray.png", "more/rgb.BMP", "palette.png", "rgb.png", "tall.png"]
    );

    for layer in [1, 2] {
        let block = AtlasBlock::decode(&manifest, layer, |path| Ok(std::fs::read(out.join(path)).unwrap())).unwrap();
        for n in 0..block.neurons {
            let top = &block.top_images[n * 3..(n + 1) * 3];
            assert!(!top.contains(&1), "neuron {n} keeps the broken image: {top:?}");
            assert!(top.iter().all(|&i| (i as usize) < images.len()), "neuron {n}: {top:?}");
            assert_eq!(block.threshold[n], block.top_norms[n * 3 + 2]);
            let norm: f32 = block.direction[n * 24..(n + 1) * 24].iter().map(|v| v * v).sum::<f32>().sqrt();
            // f16 storage: each component within 2^-11 relative, so the norm within 1e-3.
            assert!((norm - 1.0).abs() < 1e-3, "block {layer} neuron {n}: direction norm {norm}");
            assert!(block.classes[n * 10..(n + 1) * 10].iter().all(|&c| c < 12));
        }
    }

    // A corrupted file is reported with its name, the expected and the found hash.
    let entry = manifest.file("block1/threshold.bin").unwrap();
    let mut bytes = std::fs::read(out.join(&entry.path)).unwrap();
    bytes[0] ^= 1;
    let error = assets::verify(entry, &bytes).unwrap_err().to_string();
    assert!(error.contains("block1/threshold.bin"), "{error}");
    assert!(error.contains(&entry.sha256), "{error}");
}

fn read_tensor(dir: &Path, manifest: &Manifest, path: &str) -> (assets::Dtype, Vec<u8>) {
    let entry = manifest.file(path).unwrap();
    (entry.dtype, std::fs::read(dir.join(path)).unwrap())
}

#[test]
fn sharded_stages_match_single_run() {
    let inputs = inputs("shards");
    let single = inputs.dir.join("single");
    atlas(&inputs, &["--out", s(&single), "--no-cache"]);

    let path = |name: &str| inputs.dir.join(name);
    // Shard 0 keeps its coefficients in a cache for pass 2; shard 1 runs the model twice.
    atlas(&inputs, &["--stage", "means", "--shard", "0/2", "--out", s(&path("means-0.part")), "--cache", s(&path("0.cache"))]);
    atlas(&inputs, &["--stage", "means", "--shard", "1/2", "--out", s(&path("means-1.part"))]);
    let output = run_ok(&["atlas-merge", s(&path("means-0.part")), s(&path("means-1.part")), "--out", s(&path("means.part"))]);
    assert!(text(&output.stdout).contains("all shards"), "{}", text(&output.stdout));

    let means = path("means.part");
    atlas(&inputs, &["--stage", "top", "--shard", "0/2", "--means", s(&means), "--out", s(&path("top-0.part")), "--cache", s(&path("0.cache"))]);
    atlas(&inputs, &["--stage", "top", "--shard", "1/2", "--means", s(&means), "--out", s(&path("top-1.part"))]);
    run_ok(&["atlas-merge", s(&path("top-1.part")), s(&path("top-0.part")), "--out", s(&path("top.part"))]);
    let sharded = path("sharded");
    atlas(&inputs, &["--stage", "finish", "--top", s(&path("top.part")), "--out", s(&sharded)]);

    let a = read_manifest(&single);
    let b = read_manifest(&sharded);
    assert_eq!(b.build.shards, 2);
    assert_eq!(a.images, b.images);
    assert_eq!(a.files.len(), b.files.len());
    for file in &a.files {
        let (dtype, x) = read_tensor(&single, &a, &file.path);
        let (_, y) = read_tensor(&sharded, &b, &file.path);
        match dtype {
            assets::Dtype::F32 => {
                // Tolerance: 1e-6 relative to the tensor's largest entry; only the order of f64
                // sums and the batching of the forward pass differ.
                let x = assets::decode_f32(file, &x).unwrap();
                let y = assets::decode_f32(b.file(&file.path).unwrap(), &y).unwrap();
                let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
                let worst = x.iter().zip(&y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(worst <= 1e-6 * scale, "{}: largest difference {worst} of {scale}", file.path);
            }
            // Indices, f16 directions and text must be identical.
            _ => assert!(x == y, "{} differs between the single and the sharded run", file.path),
        }
    }
}

#[test]
fn atlas_stage_errors_explain_the_fix() {
    let inputs = inputs("errors");
    let mut args = vec!["atlas"];
    args.extend(common(&inputs, "3"));

    let out = inputs.dir.join("top.part");
    let output = clip_lens(&[args.as_slice(), &["--stage", "top", "--out", s(&out)]].concat());
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("needs --means FILE"), "{}", text(&output.stderr));

    let means = inputs.dir.join("means-0.part");
    run_ok(&[args.as_slice(), &["--stage", "means", "--shard", "0/2", "--out", s(&means)]].concat());
    let output = clip_lens(&[args.as_slice(), &["--stage", "top", "--shard", "0/2", "--means", s(&means), "--out", s(&out)]].concat());
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("shards 1/2 are missing"), "{}", text(&output.stderr));

    let mut too_many = vec!["atlas"];
    too_many.extend(common(&inputs, "9"));
    let output = clip_lens(&[too_many.as_slice(), &["--out", s(&inputs.dir.join("atlas"))]].concat());
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("only 8 of 9 images could be read"), "{}", text(&output.stderr));

    let mut more_than_listed = vec!["atlas"];
    more_than_listed.extend(common(&inputs, "10"));
    let output = clip_lens(&[more_than_listed.as_slice(), &["--out", s(&inputs.dir.join("atlas"))]].concat());
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("found 9 images"), "{}", text(&output.stderr));

    let not_empty = inputs.dir.join("images");
    let output = clip_lens(&[args.as_slice(), &["--out", s(&not_empty)]].concat());
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("contains no atlas"), "{}", text(&output.stderr));
}

/// Runs `clip-lens atlas` with `options` and expects it to fail before pass 1 without creating
/// `out`. Returns stderr.
fn fails_before_pass_one(options: &[&str], out: &Path) -> String {
    let mut args = vec!["atlas", "--out", s(out)];
    args.extend(options);
    let output = clip_lens(&args);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded:\n{stderr}");
    assert!(!stderr.contains("pass 1"), "{args:?} ran pass 1 before failing:\n{stderr}");
    assert!(!out.exists(), "{args:?} left {} behind", out.display());
    stderr
}

#[test]
fn atlas_checks_options_before_pass_one() {
    let inputs = inputs("early");
    let write = |name: &str, contents: &str| {
        let path = inputs.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    };
    let empty = write("empty.txt", "");
    let short = write("short.txt", "cat\ndog\n");
    let bad_json = write("bad.json", r#"{"classes": ["#);
    let no_slot = write("no-slot.json", r#"{"classes": ["dog"], "templates": ["a photo"], "source": "", "license": ""}"#);
    let no_classes = write("no-classes.json", r#"{"classes": [], "templates": ["{}"], "source": "", "license": ""}"#);
    let line_break = write("line-break.json", r#"{"classes": ["dog", "a\nb"], "templates": ["{}"], "source": "", "license": ""}"#);

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--templates", "81"], "built-in assets/imagenet.json has only 80 templates"),
        (vec!["--vocabulary", s(&empty)], "no descriptions"),
        (vec!["--vocabulary", s(&short), "--terms", "4"], "has 2 texts, fewer than --terms 4"),
        (vec!["--classes", s(&bad_json)], "invalid JSON"),
        (vec!["--classes", s(&no_slot)], "exactly one `{}`"),
        (vec!["--classes", s(&no_classes)], "0 classes"),
        (vec!["--classes", s(&line_break)], "class 1 (\"a\\nb\") contains a line break"),
        (vec!["--shard", "0/2"], "--shard applies only to --stage means and top"),
        (vec!["--layers", "2,1,1"], "block 1 is given twice"),
    ];
    let out = inputs.dir.join("atlas");
    for (options, expected) in cases {
        let mut args = vec!["--model", s(&inputs.model), "--images", s(&inputs.images), "--k", "3"];
        args.extend(options);
        let stderr = fails_before_pass_one(&args, &out);
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in\n{stderr}");
    }
}

#[test]
fn atlas_removes_out_after_failed_pass() {
    let inputs = inputs("failed-pass");
    let out = inputs.dir.join("atlas");
    let mut args = vec!["atlas"];
    args.extend(common(&inputs, "9"));
    args.extend(["--out", s(&out)]);
    let output = clip_lens(&args);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("only 8 of 9 images could be read"), "{}", text(&output.stderr));
    assert!(!out.exists(), "{} was left behind", out.display());
}

#[test]
fn atlas_warns_on_duplicates_and_counts_skips() {
    let inputs = inputs("duplicates");
    let words = "cat\ndog\ncat\ntree\ndog\ncat\n";
    std::fs::write(&inputs.vocabulary, words).unwrap();
    let json = serde_json::json!({
        "classes": ["tabby cat", "sailboat", "tabby cat", "beach"],
        "templates": ["a photo of a {}."],
        "source": "written for this test",
        "license": "none needed",
    });
    std::fs::write(&inputs.classes, json.to_string()).unwrap();
    let out = inputs.dir.join("atlas");
    let output = atlas(&inputs, &["--out", s(&out)]);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("contains 1 duplicate class name, the first is \"tabby cat\""), "{stderr}");
    assert!(stderr.contains("contains 3 duplicate texts, the first is \"cat\""), "{stderr}");
    // Pass 1 counts only the images it read: one of the nine files is broken.
    assert!(stderr.contains("pass 1 (means): 8 images in"), "{stderr}");
    assert!(stderr.contains("1 of 9 files skipped"), "{stderr}");
    assert_eq!(read_manifest(&out).classes.count, 4);
}

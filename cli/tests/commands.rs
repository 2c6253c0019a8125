//! The `clip-lens` binary end to end: every subcommand on a tiny random model and on the
//! open_clip reference fixture, and its errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn clip_lens(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clip-lens")).args(args).output().expect("clip-lens runs")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("clip-lens-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_subcommands() {
    let output = clip_lens(&["--help"]);
    assert!(output.status.success());
    let help = text(&output.stdout);
    let commands = [
        "preprocess", "embed", "effects", "bench", "bench-omp", "bench-text", "random-model",
        "atlas", "atlas-merge", "tokenize", "embed-text",
    ];
    for command in commands {
        assert!(help.contains(command), "--help does not list {command}:\n{help}");
    }
    for command in commands {
        let output = clip_lens(&[command, "--help"]);
        assert!(output.status.success(), "{command} --help failed");
    }
}

#[test]
fn embed_matches_open_clip_on_fixture_input() {
    // The first image of the fixture batch, written as a [3, S, S] input; tolerance 1e-4
    // relative to the largest embedding entry.
    let dir = temp_dir("embed");
    let model = fixtures().join("models/openclip-quickgelu");
    let batch = engine::npy::read(&model.join("expected/input.npy")).unwrap();
    let per_image = batch.data.len() / batch.shape[0];
    let input = dir.join("input.npy");
    engine::npy::write(&input, &engine::npy::Array::new(batch.shape[1..].to_vec(), batch.data[..per_image].to_vec())).unwrap();

    let out = dir.join("embedding.npy");
    let output = clip_lens(&["embed", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let actual = engine::npy::read(&out).unwrap();
    let expected = engine::npy::read(&model.join("expected/embedding.npy")).unwrap();
    let d = expected.shape[1];
    assert_eq!(actual.shape, vec![d]);
    let scale = expected.data[..d].iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (a, e) in actual.data.iter().zip(&expected.data[..d]) {
        assert!((a - e).abs() <= 1e-4 * scale, "{a} vs {e}");
    }
}

#[test]
fn effects_writes_matrix_and_prints_top_neurons() {
    let dir = temp_dir("effects");
    let model = dir.join("model");
    let output = clip_lens(&["random-model", "--preset", "tiny", "--seed", "3", "--out", model.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));

    let image = fixtures().join("images");
    let photo = std::fs::read_dir(&image)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "jpg"))
        .expect("a JPEG photograph in fixtures/images");
    let out = dir.join("effects.npy");
    let output = clip_lens(&[
        "effects", "--model", model.to_str().unwrap(), "--image", photo.to_str().unwrap(),
        "--layer", "2", "--out", out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let effects = engine::npy::read(&out).unwrap();
    assert_eq!(effects.shape, vec![128, 24], "tiny preset: N = 128 neurons, d = 24");
    let stdout = text(&output.stdout);
    let rows = stdout.lines().filter(|l| l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit())).count();
    assert_eq!(rows, 20, "expected 20 neuron rows:\n{stdout}");

    // The printed norms are the norms of the written rows, largest first.
    let mut norms: Vec<f32> = effects.data.chunks(24).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
    norms.sort_by(|a, b| b.total_cmp(a));
    let first: f32 = stdout.lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        let (n, v) = (parts.next()?, parts.next()?);
        n.parse::<usize>().ok().and(v.parse().ok())
    }).unwrap();
    assert!((first - norms[0]).abs() <= 1e-3 * norms[0], "{first} vs {}", norms[0]);

    let pre = dir.join("pre.npy");
    let output = clip_lens(&["preprocess", "--model", model.to_str().unwrap(), "--image", photo.to_str().unwrap(), "--out", pre.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(engine::npy::read(&pre).unwrap().shape, vec![3, 32, 32]);
}

#[test]
fn bench_prints_json() {
    let output = clip_lens(&["bench", "--preset", "tiny", "--iterations", "1", "--batch", "2", "--json"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(value["forward_ms_per_image"].as_f64().unwrap() > 0.0);
    assert!(value["lens_ms_per_image"].as_f64().unwrap() > 0.0);
}

#[test]
fn errors_go_to_stderr_with_failure() {
    let dir = temp_dir("errors");
    let model = dir.join("model");
    assert!(clip_lens(&["random-model", "--preset", "tiny", "--out", model.to_str().unwrap()]).status.success());

    let bad_image = dir.join("not-an-image.png");
    std::fs::write(&bad_image, "hello").unwrap();
    let output = clip_lens(&["embed", "--model", model.to_str().unwrap(), "--image", bad_image.to_str().unwrap(), "--out", "/dev/null"]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.starts_with("error:"), "{stderr}");
    assert!(stderr.contains("not-an-image.png"), "{stderr}");

    let output = clip_lens(&["effects", "--model", model.to_str().unwrap(), "--image", bad_image.to_str().unwrap(), "--layer", "3", "--out", "/dev/null"]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("no later block"), "{}", text(&output.stderr));

    let wrong = dir.join("wrong.npy");
    engine::npy::write(&wrong, &engine::npy::Array::new(vec![3, 8, 8], vec![0.0; 192])).unwrap();
    let output = clip_lens(&["embed", "--model", model.to_str().unwrap(), "--input", wrong.to_str().unwrap(), "--out", "/dev/null"]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("[3, 32, 32]"), "{}", text(&output.stderr));

    let output = clip_lens(&["random-model", "--preset", "nope", "--out", dir.join("x").to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("unknown preset"), "{}", text(&output.stderr));
}

#[test]
fn tokenize_prints_open_clip_ids() {
    // The ids of open_clip 3.3.0's tokenizer for this string, from fixtures/text/tokenizer_cases.json.
    let model = fixtures().join("models/openclip-quickgelu");
    let output = clip_lens(&["tokenize", "--model", model.to_str().unwrap(), "--text", "A PHOTO OF A DOG"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "49406 320 1125 539 320 1929 49407");
}

#[test]
fn embed_text_writes_unit_rows() {
    let dir = temp_dir("embed-text");
    let model = dir.join("model");
    let output = clip_lens(&["random-model", "--preset", "tiny", "--seed", "5", "--out", model.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let texts = dir.join("texts.txt");
    std::fs::write(&texts, "a photo of a dog\nstripes\ndog\n").unwrap();

    let all = dir.join("all.npy");
    let output = clip_lens(&["embed-text", "--model", model.to_str().unwrap(), "--file", texts.to_str().unwrap(), "--out", all.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let all = engine::npy::read(&all).unwrap();
    assert_eq!(all.shape.len(), 2);
    assert_eq!(all.shape[0], 3, "one row per line");
    let d = all.shape[1];
    for row in all.data.chunks(d) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        // Unit length up to f32 rounding.
        assert!((norm - 1.0).abs() < 1e-5, "row norm {norm}");
    }

    // The same text alone gives the same row: batching and length sorting change nothing
    // beyond f32 rounding (1e-5 absolute on unit vectors).
    let one = dir.join("one.npy");
    let output = clip_lens(&["embed-text", "--model", model.to_str().unwrap(), "--text", "dog", "--out", one.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let one = engine::npy::read(&one).unwrap();
    assert_eq!(one.shape, vec![1, d]);
    for (a, b) in one.data.iter().zip(&all.data[2 * d..]) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn model_and_output_errors_read_once() {
    let dir = temp_dir("model-errors");
    let model = dir.join("model");
    assert!(clip_lens(&["random-model", "--preset", "tiny", "--out", model.to_str().unwrap()]).status.success());

    // The OS error appears once, not again from the error's source.
    let output = clip_lens(&["embed-text", "--model", model.to_str().unwrap(), "--text", "dog", "--out", "/nonexistent/dir/o.npy"]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("cannot create /nonexistent/dir/o.npy"), "{stderr}");
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
    assert!(stderr.contains("embedded 1 text in"), "{stderr}");

    let bad = dir.join("m_badjson");
    std::fs::create_dir_all(&bad).unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, bad.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(bad.join("config.json"), "{").unwrap();
    for command in [&["embed", "--image", "x.png", "--out", "/dev/null"][..], &["tokenize", "--text", "dog"][..]] {
        let mut args = vec![command[0], "--model", bad.to_str().unwrap()];
        args.extend(&command[1..]);
        let output = clip_lens(&args);
        assert!(!output.status.success());
        let stderr = text(&output.stderr);
        assert!(stderr.contains("invalid model config: "), "{stderr}");
        assert!(stderr.contains("config.json: config is not valid JSON"), "{stderr}");
        assert_eq!(stderr.matches("invalid model config").count(), 1, "{stderr}");
    }

    let missing = dir.join("no-such-model");
    let output = clip_lens(&["tokenize", "--model", missing.to_str().unwrap(), "--text", "dog"]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("no-such-model does not exist"), "{stderr}");
    assert!(!stderr.contains("no model config found"), "{stderr}");
}

//! Compares the engine's text tower with open_clip 3.3.0 and transformers 5.25.0 on the tiny
//! seeded models of fixtures/models/ (token batches in fixtures/models/*/expected/ and
//! fixtures/text/embeddings/), and checks that cutting sequences after their end token gives the
//! embeddings of the full 77-token computation.

use std::path::{Path, PathBuf};

use engine::npy::Array;
use engine::random::StorageType;
use engine::text::{load_text, load_text_from_dir, normalize_rows, TextTransformer};
use engine::tokenizer::ClipTokenizer;
use engine::weights::{Naming, WeightFile};
use engine::{ClipConfig, Device, Tensor};

/// Max |engine - reference| over max |reference|, against open_clip and transformers.
const REFERENCE_TOLERANCE: f64 = 1e-4;
/// The same measure between the cut and the full 77-token computation in the engine.
const TRUNCATION_TOLERANCE: f64 = 1e-5;

/// The fixture models: the float32 ones and the f16 and bf16 roundings, whose expected outputs
/// come from float32 runs on the rounded weights.
const MODELS: &[&str] = &[
    "openclip-quickgelu",
    "openclip-quickgelu-f16",
    "openclip-quickgelu-bf16",
    "openclip-gelu",
    "hf-clip",
];

/// Models with embeddings of the longer token batch in fixtures/text/embeddings/.
const TEXT_FIXTURE_MODELS: &[&str] = &["openclip-quickgelu", "openclip-gelu", "hf-clip"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read_npy(path: &Path) -> Array {
    engine::npy::read(path).unwrap_or_else(|e| {
        panic!("{e} (regenerate with tools/fixtures_models.py and tools/fixtures_text.py)")
    })
}

fn load(model: &str) -> TextTransformer {
    let dir = repo_root().join("fixtures/models").join(model);
    load_text_from_dir(&dir, &Device::flex())
        .unwrap_or_else(|e| panic!("failed to load the text tower of {}: {e}", dir.display()))
}

/// Rows of a [B, 77] float32 token array as id sequences.
fn token_rows(array: &Array) -> Vec<Vec<u32>> {
    let [rows, cols] = array.shape[..] else { panic!("token arrays are 2-D, got {:?}", array.shape) };
    (0..rows).map(|r| array.data[r * cols..(r + 1) * cols].iter().map(|&v| v as u32).collect()).collect()
}

fn values(tensor: Tensor<2>) -> (Vec<usize>, Vec<f32>) {
    let shape = tensor.dims().to_vec();
    (shape, tensor.into_data().try_into_vec::<f32>().expect("engine tensors hold f32"))
}

/// Returns max |actual - expected| / max |expected|, after checking the shapes; NaN counts as
/// infinitely wrong.
fn relative_error(label: &str, actual: Tensor<2>, expected: &Array) -> f64 {
    let (shape, data) = values(actual);
    assert_eq!(shape, expected.shape, "{label}: shape");
    let scale = expected.data.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    assert!(scale > 0.0, "{label}: the reference is all zeros");
    let worst = data.iter().zip(&expected.data).fold(0.0f64, |m, (&a, &e)| {
        let error = (a as f64 - e as f64).abs();
        if error.is_nan() { f64::INFINITY } else { m.max(error) }
    });
    worst / scale
}

fn assert_close(label: &str, actual: Tensor<2>, expected: &Array, tolerance: f64) {
    let error = relative_error(label, actual, expected);
    println!("{label}: relative error {error:.2e}");
    assert!(error <= tolerance, "{label}: relative error {error:.3e} exceeds {tolerance:.0e}");
}

fn as_array(tensor: Tensor<2>) -> Array {
    let (shape, data) = values(tensor);
    Array::new(shape, data)
}

#[test]
fn model_fixture_embeddings_match_reference() {
    for model in MODELS {
        let tower = load(model);
        let expected_dir = repo_root().join("fixtures/models").join(model).join("expected");
        let tokens = token_rows(&read_npy(&expected_dir.join("text_tokens.npy")));
        let expected = read_npy(&expected_dir.join("text_embedding.npy"));

        let cut = tower.embed(&tokens).expect("fixture tokens embed");
        assert_close(&format!("{model}: embed"), cut, &expected, REFERENCE_TOLERANCE);
        let full = tower.embed_full77(&tokens).expect("fixture tokens embed");
        assert_close(&format!("{model}: embed_full77"), full, &expected, REFERENCE_TOLERANCE);
    }
}

#[test]
fn text_fixture_embeddings_match_reference() {
    let dir = repo_root().join("fixtures/text/embeddings");
    let tokens = token_rows(&read_npy(&dir.join("tokens.npy")));
    for model in TEXT_FIXTURE_MODELS {
        let tower = load(model);
        let expected = read_npy(&dir.join(format!("{model}.npy")));
        // Batch sizes 1 and 4 split equal lengths over several batches and mix lengths in one.
        for batch_size in [1, 4, 256] {
            let cut = tower.embed_batched(&tokens, batch_size).expect("fixture tokens embed");
            let label = format!("{model}: embed, batch size {batch_size}");
            assert_close(&label, cut, &expected, REFERENCE_TOLERANCE);
        }
        let full = tower.embed_full77(&tokens).expect("fixture tokens embed");
        assert_close(&format!("{model}: embed_full77"), full, &expected, REFERENCE_TOLERANCE);
    }
}

/// Accepts the tokenizer's unpadded rows as well as open_clip's padded ones.
#[test]
fn padding_does_not_change_embedding() {
    let tower = load("openclip-quickgelu");
    let dir = repo_root().join("fixtures/text/embeddings");
    let padded = token_rows(&read_npy(&dir.join("tokens.npy")));
    let unpadded: Vec<Vec<u32>> = padded
        .iter()
        .map(|row| {
            let end = row.iter().rposition(|&id| id != 0).expect("rows are not all padding");
            row[..=end].to_vec()
        })
        .collect();
    let reference = as_array(tower.embed(&padded).expect("embeds"));
    assert_close("unpadded rows", tower.embed(&unpadded).expect("embeds"), &reference, 1e-6);
}

/// A random model with CLIP's real vocabulary, run on the tokenizer's ids of the fixture strings.
fn random_tower(naming: Naming) -> TextTransformer {
    let config = ClipConfig::preset("tiny").expect("tiny is a preset");
    let generated = engine::random::generate(&config, 7, naming, StorageType::F32).expect("generates");
    let file = WeightFile::parse(&generated.safetensors, "random tiny model").expect("parses");
    load_text(&file, &config, &Device::flex()).expect("loads")
}

fn fixture_token_rows() -> Vec<Vec<u32>> {
    let tokenizer = ClipTokenizer::from_file(&repo_root().join("assets/clip-tokenizer.json"))
        .expect("the shipped tokenizer loads");
    let text = std::fs::read_to_string(repo_root().join("fixtures/text/tokenizer_cases.json"))
        .expect("tokenizer_cases.json is readable");
    let document: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    document["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|case| tokenizer.encode(case["text"].as_str().expect("text")).expect("tokenizes"))
        .collect()
}

#[test]
fn truncated_matches_full_context() {
    let tower = random_tower(Naming::OpenAi);
    let tokens = fixture_token_rows();
    let lengths: Vec<usize> = tokens.iter().map(Vec::len).collect();
    assert!(lengths.contains(&2), "the shortest length, 2, is covered");
    assert!(lengths.contains(&77), "the full context, 77, is covered");

    let full = as_array(tower.embed_full77(&tokens).expect("embeds"));
    for batch_size in [7, 256] {
        let cut = tower.embed_batched(&tokens, batch_size).expect("embeds");
        let label = format!("cut against full context, batch size {batch_size}");
        assert_close(&label, cut, &full, TRUNCATION_TOLERANCE);
    }
}

#[test]
fn namings_load_same_tower() {
    let tokens = fixture_token_rows();
    let openai = as_array(random_tower(Naming::OpenAi).embed(&tokens).expect("embeds"));
    let hugging_face = random_tower(Naming::HuggingFace).embed(&tokens).expect("embeds");
    assert_close("Hugging Face naming against OpenAI naming", hugging_face, &openai, 1e-6);
}

#[test]
fn normalized_rows_have_unit_length() {
    let tower = random_tower(Naming::OpenAi);
    let tokenizer = ClipTokenizer::from_file(&repo_root().join("assets/clip-tokenizer.json"))
        .expect("the shipped tokenizer loads");
    let texts = ["a photo of a cat", "", "dog", &"long ".repeat(100)];
    let normalized = tower.embed_texts_normalized(&tokenizer, &texts).expect("embeds");
    let tokens = tokenizer.encode_batch(&texts).expect("tokenizes");
    let expected = as_array(normalize_rows(tower.embed(&tokens).expect("embeds")));

    let (shape, data) = values(normalized.clone());
    assert_eq!(shape, vec![texts.len(), tower.embed_dim()]);
    for (row, values) in data.chunks(shape[1]).enumerate() {
        let norm = values.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "row {row} has norm {norm}");
    }
    assert_close("normalized against normalize_rows(embed)", normalized, &expected, 1e-6);
}

#[test]
fn invalid_tokens_are_rejected() {
    let tower = load("openclip-quickgelu");
    let out_of_vocabulary = tower.embed(&[vec![998, 1000, 999]]).err().expect("id 1000 is rejected");
    assert!(out_of_vocabulary.to_string().contains("1000"), "{out_of_vocabulary}");
    let empty = tower.embed(&[vec![998, 999], vec![]]).err().expect("an empty sequence is rejected");
    assert!(empty.to_string().contains("sequence 1"), "{empty}");
    let mut late_end = vec![5u32; 100];
    late_end[90] = 999;
    assert!(tower.embed(&[late_end]).is_err(), "an end token past the context is rejected");
    assert!(tower.embed_batched(&[vec![998, 999]], 0).is_err(), "batch size 0 is rejected");
}

#[test]
fn empty_batch_gives_empty_matrix() {
    let tower = load("openclip-quickgelu");
    let embedding = tower.embed(&[]).expect("no sequences is valid");
    assert_eq!(embedding.dims(), [0, tower.embed_dim()]);
}

#[test]
fn missing_text_tensor_is_named() {
    let config = ClipConfig::preset("tiny").expect("tiny is a preset");
    let mut deeper = config.clone();
    deeper.text.layers += 1;
    let generated = engine::random::generate(&config, 7, Naming::OpenAi, StorageType::F32).expect("generates");
    let file = WeightFile::parse(&generated.safetensors, "tiny.safetensors").expect("parses");
    let error = load_text(&file, &deeper, &Device::flex()).err().expect("a missing block is an error");
    let message = error.to_string();
    assert!(message.contains("transformer.resblocks.2"), "{message}");
    assert!(message.contains("tiny.safetensors"), "{message}");
}

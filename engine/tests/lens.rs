//! The factorized lens against the literal definition on seeded random models.

use engine::lens::{literal, Lens};
use engine::model::RecordOptions;
use engine::random::{generate, StorageType};
use engine::weights::{load_clip, Naming};
use engine::{ClipConfig, Device, Tensor, TensorData};

fn random_model(preset: &str, seed: u64, activation: engine::Activation) -> engine::model::ClipModel {
    let mut config = ClipConfig::preset(preset).unwrap();
    config.activation = activation;
    let generated = generate(&config, seed, Naming::OpenAi, StorageType::F32).unwrap();
    load_clip(&generated.config_json, &generated.safetensors, "random", &Device::flex()).unwrap()
}

fn random_pixels(batch: usize, size: usize, seed: u64) -> Tensor<4> {
    let mut rng = engine::random::Rng::new(seed);
    let values = rng.normal_vec(batch * 3 * size * size, 0.0, 1.0);
    Tensor::from_data(TensorData::new(values, [batch, 3, size, size]), &Device::flex())
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Largest |a - b| relative to the largest |b| over the whole array.
fn relative_error(actual: &[f32], expected: &[f64]) -> f64 {
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let worst = actual.iter().zip(expected).fold(0.0f64, |m, (a, e)| m.max((*a as f64 - e).abs()));
    worst / scale
}

#[test]
fn factorized_effects_match_literal() {
    // Tolerance: 1e-4 relative to the largest effect entry (f32 factorized vs f64 literal).
    for (seed, activation) in [(1, engine::Activation::QuickGelu), (2, engine::Activation::Gelu)] {
        let model = random_model("tiny", seed, activation);
        let layers = [0, 1, 2];
        let lens = Lens::new(&model.vision, &layers).unwrap();
        let output = model.vision.forward(random_pixels(2, 32, seed + 10), &RecordOptions::lens(&layers));
        let recording = output.recording.as_ref().unwrap();
        for layer in layers {
            let coefficients = lens.coefficients(&output.embedding, recording, layer).unwrap();
            let fast = to_vec(lens.effects(&coefficients).unwrap());
            let slow: Vec<f64> = literal::effects(&model.vision, &output.embedding, recording, layer)
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            assert_eq!(fast.len(), slow.len());
            let error = relative_error(&fast, &slow);
            eprintln!("block {layer}, seed {seed}: relative error {error:e}");
            assert!(error < 1e-4, "block {layer}, seed {seed}: relative error {error:e}");
        }
    }
}

#[test]
fn effect_norms_match_full_effects() {
    // Tolerance: 1e-4 relative to the largest norm; the Gram form sums squares of f32 values.
    let model = random_model("tiny", 3, engine::Activation::QuickGelu);
    let layers = [1];
    let lens = Lens::new(&model.vision, &layers).unwrap();
    let output = model.vision.forward(random_pixels(3, 32, 4), &RecordOptions::lens(&layers));
    let recording = output.recording.as_ref().unwrap();
    let coefficients = lens.coefficients(&output.embedding, recording, 1).unwrap();
    let norms = to_vec(lens.effect_norms(&coefficients).unwrap());
    let effects = to_vec(lens.effects(&coefficients).unwrap());
    let d = model.config.embed_dim;
    let expected: Vec<f64> = effects
        .chunks(d)
        .map(|e| e.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt())
        .collect();
    let error = relative_error(&norms, &expected);
    assert!(error < 1e-4, "relative error {error:e}");
}

#[test]
fn shared_term_is_not_negligible() {
    // The share term s must be present: effects of a neuron with zero activation everywhere
    // are exactly s, so compare the mean effect norm with |s|.
    let model = random_model("tiny", 5, engine::Activation::QuickGelu);
    let lens = Lens::new(&model.vision, &[2]).unwrap();
    let output = model.vision.forward(random_pixels(1, 32, 6), &RecordOptions::lens(&[2]));
    let coefficients = lens.coefficients(&output.embedding, output.recording.as_ref().unwrap(), 2).unwrap();
    let shared = to_vec(coefficients.shared.clone());
    let shared_norm = shared.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!(shared_norm > 0.0, "share term is zero");
}

#[test]
fn lens_rejects_last_block() {
    let model = random_model("tiny", 7, engine::Activation::QuickGelu);
    let error = Lens::new(&model.vision, &[3]).unwrap_err().to_string();
    assert!(error.contains("no later block"), "{error}");
}

#[test]
fn default_layers_for_depths() {
    assert_eq!(engine::lens::default_layers(12), vec![8, 9, 10]);
    assert_eq!(engine::lens::default_layers(24), vec![20, 21, 22]);
    assert_eq!(engine::lens::default_layers(4), vec![0, 1, 2]);
    assert_eq!(engine::lens::default_layers(2), vec![0]);
}

//! Compares the engine with open_clip 3.3.0 and transformers 5.25.0 on the tiny seeded models in
//! `fixtures/models/`, which `tools/fixtures_models.py` writes and its README describes. The
//! checks cover the image embedding, every recorded quantity the lens uses, and the second-order
//! effects against a literal float64 evaluation of their definition.

use std::path::{Path, PathBuf};

use engine::lens::Lens;
use engine::model::{ClipModel, RecordOptions, VisionOutput};
use engine::npy::Array;
use engine::{Activation, ClipConfig, Device, Tensor, TensorData};

/// Max error relative to the largest expected magnitude, for every comparison below.
const EMBEDDING_TOLERANCE: f64 = 1e-4;
const RECORDING_TOLERANCE: f64 = 1e-4;
const EFFECTS_TOLERANCE: f64 = 1e-4;

/// Source blocks whose effects the fixtures contain.
const EFFECT_LAYERS: [usize; 2] = [1, 2];

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models")
}

fn read_expected(model: &str, file: &str) -> Array {
    let path = fixtures_dir().join(model).join("expected").join(file);
    engine::npy::read(&path).unwrap_or_else(|e| {
        panic!("{e} (regenerate with /opt/refenv/bin/python tools/fixtures_models.py)")
    })
}

fn load(model: &str) -> ClipModel {
    let dir = fixtures_dir().join(model);
    engine::weights::load_model_dir(&dir, &Device::flex())
        .unwrap_or_else(|e| panic!("failed to load {}: {e}", dir.display()))
}

/// Runs the vision tower on the fixture's input batch, recording every block.
fn run(model: &ClipModel, name: &str) -> VisionOutput {
    let input = read_expected(name, "input.npy");
    let shape: [usize; 4] = input.shape.clone().try_into().expect("input.npy should be 4-D");
    let pixels = Tensor::<4>::from_data(TensorData::new(input.data, shape), &Device::flex());
    model.vision.forward(pixels, &RecordOptions::all(&model.vision.config))
}

fn values<const D: usize>(tensor: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    let shape = tensor.dims().to_vec();
    let data = tensor.into_data().try_into_vec::<f32>().expect("engine tensors should hold f32");
    (shape, data)
}

/// Returns the multi-index of flat position `flat` in a C-order array of `shape`.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (axis, &size) in shape.iter().enumerate().rev() {
        index[axis] = flat % size;
        flat /= size;
    }
    index
}

/// Asserts that `actual` matches `expected` in shape and that max |actual - expected| divided by
/// max |expected| is at most `tolerance`; the message names the worst element.
fn assert_close<const D: usize>(label: &str, actual: Tensor<D>, expected: &Array, tolerance: f64) {
    let (shape, data) = values(actual);
    assert_eq!(shape, expected.shape, "{label}: shape of engine output against fixture");

    let scale = expected.data.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    assert!(scale > 0.0, "{label}: the fixture is all zeros, so the comparison would be empty");
    let mut worst = (0.0f64, 0usize);
    for (i, (&a, &e)) in data.iter().zip(&expected.data).enumerate() {
        let error = (a as f64 - e as f64).abs();
        // A NaN must fail, so it counts as the worst error.
        if error.is_nan() || error > worst.0 {
            worst = (if error.is_nan() { f64::INFINITY } else { error }, i);
        }
    }
    let relative = worst.0 / scale;
    assert!(
        relative <= tolerance,
        "{label}: max error {relative:.3e} of max |expected| {scale:.4} exceeds {tolerance:.0e} \
         at index {:?}: engine {}, reference {}",
        unravel(worst.1, &shape),
        data[worst.1],
        expected.data[worst.1],
    );
}

fn check_embedding(name: &str) {
    let model = load(name);
    let output = run(&model, name);
    assert_close(
        &format!("{name} embedding"),
        output.embedding,
        &read_expected(name, "embedding.npy"),
        EMBEDDING_TOLERANCE,
    );
}

fn check_recording(name: &str) {
    let model = load(name);
    let layers = model.vision.config.layers;
    let recording = run(&model, name).recording.expect("forward should return a recording");

    assert_eq!(recording.ln1_mean.len(), layers, "{name}: LN1 means per block");
    assert_eq!(recording.ln1_scale.len(), layers, "{name}: LN1 scales per block");
    assert_eq!(recording.attn_class.len(), layers, "{name}: attention rows per block");
    for layer in 0..layers {
        let hook = |point: &str| format!("blocks.{layer}.{point}");
        let mlp_post = recording
            .mlp_post
            .get(&layer)
            .unwrap_or_else(|| panic!("{name}: no MLP post-activations recorded for block {layer}"))
            .clone();
        let checks: [(String, Tensor<3>); 2] = [
            (hook("mlp.hook_post"), mlp_post),
            (hook("attn.hook_pattern_class"), recording.attn_class[layer].clone()),
        ];
        for (point, actual) in checks {
            let expected = read_expected(name, &format!("{point}.npy"));
            assert_close(&format!("{name} {point}"), actual, &expected, RECORDING_TOLERANCE);
        }
        let checks: [(String, Tensor<2>); 2] = [
            (hook("ln1.hook_mean"), recording.ln1_mean[layer].clone()),
            (hook("ln1.hook_scale"), recording.ln1_scale[layer].clone()),
        ];
        for (point, actual) in checks {
            let expected = read_expected(name, &format!("{point}.npy"));
            assert_close(&format!("{name} {point}"), actual, &expected, RECORDING_TOLERANCE);
        }
    }

    let ln_post_mean = recording.ln_post_mean.expect("LN_post mean should be recorded");
    let ln_post_scale = recording.ln_post_scale.expect("LN_post scale should be recorded");
    let checks: [(&str, Tensor<1>); 2] =
        [("ln_post.hook_mean", ln_post_mean), ("ln_post.hook_scale", ln_post_scale)];
    for (point, actual) in checks {
        let expected = read_expected(name, &format!("{point}.npy"));
        assert_close(&format!("{name} {point}"), actual, &expected, RECORDING_TOLERANCE);
    }
}

fn check_effects(name: &str) {
    let model = load(name);
    let output = run(&model, name);
    let recording = output.recording.as_ref().expect("forward should return a recording");
    let lens = Lens::new(&model.vision, &EFFECT_LAYERS)
        .unwrap_or_else(|e| panic!("{name}: failed to build the lens: {e}"));
    for layer in EFFECT_LAYERS {
        let coefficients = lens
            .coefficients(&output.embedding, recording, layer)
            .unwrap_or_else(|e| panic!("{name}: lens coefficients of block {layer}: {e}"));
        let effects = lens
            .effects(&coefficients)
            .unwrap_or_else(|e| panic!("{name}: lens effects of block {layer}: {e}"));
        let expected = read_expected(name, &format!("effects_layer{layer}.npy"));
        assert_close(
            &format!("{name} effects of block {layer}"),
            effects,
            &expected,
            EFFECTS_TOLERANCE,
        );
    }
}

/// One module per fixture model, with a test per compared quantity.
macro_rules! reference_model_tests {
    ($module:ident, $name:literal) => {
        mod $module {
            #[test]
            fn embedding() {
                super::check_embedding($name);
            }

            #[test]
            fn recording() {
                super::check_recording($name);
            }

            #[test]
            fn effects() {
                super::check_effects($name);
            }
        }
    };
}

reference_model_tests!(openclip_quickgelu, "openclip-quickgelu");
reference_model_tests!(openclip_quickgelu_f16, "openclip-quickgelu-f16");
reference_model_tests!(openclip_quickgelu_bf16, "openclip-quickgelu-bf16");
reference_model_tests!(openclip_gelu, "openclip-gelu");
reference_model_tests!(hf_clip, "hf-clip");

#[test]
fn fixture_configs_pick_activation() {
    let cases = [
        ("openclip-quickgelu", Activation::QuickGelu),
        ("openclip-gelu", Activation::Gelu),
        ("hf-clip", Activation::QuickGelu),
    ];
    for (name, activation) in cases {
        assert_eq!(load(name).config.activation, activation, "{name}: activation");
    }
}

fn read_config(file: &str) -> ClipConfig {
    let path = fixtures_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    ClipConfig::from_json(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn b32_configs_match_preset() {
    let preset = ClipConfig::preset("ViT-B-32").unwrap();
    // open_clip's ViT-B-32.json has no quick_gelu key, so open_clip builds it with exact GELU;
    // OpenAI's weights need ViT-B-32-quickgelu.json, which the preset follows.
    let cases = [
        ("openclip-b32-shaped-config.json", Activation::Gelu),
        ("hf-b32-config.json", Activation::QuickGelu),
    ];
    for (file, activation) in cases {
        let config = read_config(file);
        assert_eq!(config.vision, preset.vision, "{file}: vision shape");
        assert_eq!(config.text, preset.text, "{file}: text shape");
        assert_eq!(config.embed_dim, preset.embed_dim, "{file}: embed_dim");
        assert_eq!(config.activation, activation, "{file}: activation");
    }
}

//! The numerical checks on burn's wgpu backend (Vulkan through Mesa's lavapipe on machines
//! without a GPU). Run with `cargo test -p engine --features wgpu --test wgpu_backend`. Every
//! test fails when no wgpu adapter initializes: none falls back to the CPU.
#![cfg(feature = "wgpu")]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use engine::device::GpuDevice;
use engine::lens::{literal, Lens};
use engine::model::RecordOptions;
use engine::random::{generate, StorageType};
use engine::weights::{load_clip, Naming};
use engine::{ClipConfig, Tensor, TensorData};

/// One runtime per process: wgpu options can be set only before the first use.
fn gpu() -> &'static GpuDevice {
    static DEVICE: OnceLock<GpuDevice> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let gpu = engine::device::gpu().unwrap_or_else(|e| {
            panic!("{e}. Install mesa-vulkan-drivers for lavapipe; this test never falls back to the CPU")
        });
        eprintln!("wgpu adapter: {} ({}, {})", gpu.adapter, gpu.backend, gpu.device_type);
        gpu
    })
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn relative_error(actual: &[f32], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "lengths differ");
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let worst = actual.iter().zip(expected).fold(0.0f64, |m, (a, e)| {
        let error = (*a as f64 - e).abs();
        if error.is_nan() { f64::INFINITY } else { m.max(error) }
    });
    worst / scale
}

#[test]
fn adapter_is_a_real_wgpu_device() {
    let gpu = gpu();
    assert!(!gpu.adapter.is_empty(), "the adapter reported no name");
    // A tensor must live on the wgpu device, not on the CPU backend.
    assert_ne!(gpu.device, engine::device::cpu(), "wgpu device equals the CPU device");
}

#[test]
fn lens_matches_literal_on_wgpu() {
    // Tolerance: 1e-4 relative to the largest effect entry.
    let device = &gpu().device;
    let config = ClipConfig::preset("tiny").unwrap();
    let generated = generate(&config, 11, Naming::OpenAi, StorageType::F32).unwrap();
    let model = load_clip(&generated.config_json, &generated.safetensors, "random", device).unwrap();
    let mut rng = engine::random::Rng::new(12);
    let pixels = Tensor::from_data(TensorData::new(rng.normal_vec(2 * 3 * 32 * 32, 0.0, 1.0), [2, 3, 32, 32]), device);
    let layers = [0, 2];
    let lens = Lens::new(&model.vision, &layers).unwrap();
    let output = model.vision.forward(pixels, &RecordOptions::lens(&layers));
    let recording = output.recording.as_ref().unwrap();
    for layer in layers {
        let coefficients = lens.coefficients(&output.embedding, recording, layer).unwrap();
        let fast = to_vec(lens.effects(&coefficients).unwrap());
        let slow: Vec<f64> = literal::effects(&model.vision, &output.embedding, recording, layer)
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        let error = relative_error(&fast, &slow);
        assert!(error < 1e-4, "block {layer}: relative error {error:e}");

        let norms = to_vec(lens.effect_norms(&coefficients).unwrap());
        let d = config.embed_dim;
        let expected: Vec<f64> =
            slow.chunks(d).map(|e| e.iter().map(|v| v * v).sum::<f64>().sqrt()).collect();
        let error = relative_error(&norms, &expected);
        assert!(error < 1e-4, "block {layer} norms: relative error {error:e}");
    }
}

fn fixture(model: &str, file: &str) -> engine::npy::Array {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(model);
    engine::npy::read(&dir.join("expected").join(file)).unwrap()
}

#[test]
fn embeddings_match_references_on_wgpu() {
    // Tolerance: 1e-4 relative to the largest embedding entry, as on the CPU.
    let device = &gpu().device;
    for name in ["openclip-quickgelu", "openclip-gelu", "hf-clip"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name);
        let model = engine::weights::load_model_dir(&dir, device).unwrap();
        let input = fixture(name, "input.npy");
        let shape: [usize; 4] = input.shape.clone().try_into().unwrap();
        let pixels = Tensor::from_data(TensorData::new(input.data, shape), device);
        let output = model.vision.forward(pixels, &RecordOptions::default());
        let expected = fixture(name, "embedding.npy");
        let expected: Vec<f64> = expected.data.iter().map(|v| *v as f64).collect();
        let error = relative_error(&to_vec(output.embedding), &expected);
        assert!(error < 1e-4, "{name}: relative error {error:e}");
    }
}

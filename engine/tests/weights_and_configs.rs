//! Model directories: both config formats, both tensor namings, the three storage types, and the
//! errors for missing tensors, wrong shapes and truncated files.

use std::path::Path;

use engine::model::RecordOptions;
use engine::random::{generate, write_model_dir, StorageType};
use engine::weights::{load_clip, load_model_dir, Naming};
use engine::{Activation, ClipConfig, Device, Tensor, TensorData};

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn open_clip_b32_config_reads() {
    let config = ClipConfig::from_json(&fixture("openclip-b32-shaped-config.json")).unwrap();
    assert_eq!(config, ClipConfig { activation: config.activation, ..ClipConfig::preset("ViT-B-32").unwrap() });
    assert_eq!(config.vision.tokens(), 50);
}

#[test]
fn hugging_face_b32_config_reads() {
    let config = ClipConfig::from_json(&fixture("hf-b32-config.json")).unwrap();
    let preset = ClipConfig::preset("ViT-B-32").unwrap();
    assert_eq!(config.vision, preset.vision);
    assert_eq!(config.embed_dim, 512);
    assert_eq!(config.activation, Activation::QuickGelu);
}

#[test]
fn presets_have_clip_shapes() {
    let l14 = ClipConfig::preset("ViT-L-14").unwrap();
    assert_eq!((l14.vision.width, l14.vision.layers, l14.vision.heads), (1024, 24, 16));
    assert_eq!(l14.vision.tokens(), 257);
    assert_eq!(ClipConfig::preset("ViT-B-16").unwrap().vision.tokens(), 197);
    let error = ClipConfig::preset("ViT-H-99").unwrap_err().to_string();
    assert!(error.contains("unknown preset 'ViT-H-99'"), "{error}");
}

#[test]
fn config_errors_name_the_key() {
    let error = ClipConfig::from_json("{\"embed_dim\": 512, \"vision_cfg\": {\"width\": 768}, \"text_cfg\": {}}")
        .unwrap_err()
        .to_string();
    assert!(error.contains("vision_cfg.image_size"), "{error}");
    let error = ClipConfig::from_json("[1, 2]").unwrap_err().to_string();
    assert!(error.contains("vision_cfg"), "{error}");
    let error = ClipConfig::from_json("{not json").unwrap_err().to_string();
    assert!(error.contains("not valid JSON"), "{error}");
}

fn embedding(config_json: &str, weights: &[u8]) -> Vec<f32> {
    let device = Device::flex();
    let model = load_clip(config_json, weights, "model.safetensors", &device).unwrap();
    let size = model.config.vision.image_size;
    let mut rng = engine::random::Rng::new(99);
    let pixels = Tensor::from_data(TensorData::new(rng.normal_vec(2 * 3 * size * size, 0.0, 1.0), [2, 3, size, size]), &device);
    let output = model.vision.forward(pixels, &RecordOptions::default());
    output.embedding.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn both_namings_give_one_model() {
    // The Hugging Face renaming must be exact: identical embeddings (tolerance 1e-6 relative).
    let config = ClipConfig::preset("tiny").unwrap();
    let openai = generate(&config, 21, Naming::OpenAi, StorageType::F32).unwrap();
    let hf = generate(&config, 21, Naming::HuggingFace, StorageType::F32).unwrap();
    assert!(hf.config_json.contains("vision_config"));
    let a = embedding(&openai.config_json, &openai.safetensors);
    let b = embedding(&hf.config_json, &hf.safetensors);
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * scale, "{x} vs {y}");
    }
}

#[test]
fn half_precision_weights_load() {
    // f16 and bf16 storage round the weights; the embeddings stay within 1e-2 relative of f32.
    let config = ClipConfig::preset("tiny").unwrap();
    let reference = generate(&config, 22, Naming::OpenAi, StorageType::F32).unwrap();
    let a = embedding(&reference.config_json, &reference.safetensors);
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for dtype in [StorageType::F16, StorageType::BF16] {
        let half = generate(&config, 22, Naming::OpenAi, dtype).unwrap();
        assert!(half.safetensors.len() < reference.safetensors.len() * 6 / 10);
        let b = embedding(&half.config_json, &half.safetensors);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-2 * scale, "{dtype:?}: {x} vs {y}");
        }
    }
}

#[test]
fn truncated_weights_name_the_file() {
    let config = ClipConfig::preset("tiny").unwrap();
    let model = generate(&config, 23, Naming::OpenAi, StorageType::F32).unwrap();
    let cut = &model.safetensors[..model.safetensors.len() / 2];
    let error = load_clip(&model.config_json, cut, "weights/model.safetensors", &Device::flex()).unwrap_err().to_string();
    assert!(error.contains("weights/model.safetensors"), "{error}");
    assert!(error.contains("truncated or corrupt"), "{error}");

    let error = load_clip(&model.config_json, b"not a safetensors file", "x.safetensors", &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(error.contains("x.safetensors"), "{error}");
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    // Weights of the tiny preset read with a config that claims a wider MLP.
    let config = ClipConfig::preset("tiny").unwrap();
    let model = generate(&config, 24, Naming::OpenAi, StorageType::F32).unwrap();
    let mut wider = config.clone();
    wider.vision.mlp_dim = 256;
    let json = serde_json::to_string(&wider.to_open_clip_json()).unwrap();
    let error = load_clip(&json, &model.safetensors, "model.safetensors", &Device::flex()).unwrap_err().to_string();
    assert!(error.contains("'visual.transformer.resblocks.0.mlp.c_fc.weight'"), "{error}");
    assert!(error.contains("[128, 32]"), "{error}");
    assert!(error.contains("[256, 32]"), "{error}");
    assert!(error.contains("model.safetensors"), "{error}");
}

#[test]
fn missing_tensor_is_named() {
    // Weights of a 4-block model read with a config that claims 5 blocks.
    let config = ClipConfig::preset("tiny").unwrap();
    let model = generate(&config, 25, Naming::OpenAi, StorageType::F32).unwrap();
    let mut deeper = config.clone();
    deeper.vision.layers = 5;
    let json = serde_json::to_string(&deeper.to_open_clip_json()).unwrap();
    let error = load_clip(&json, &model.safetensors, "model.safetensors", &Device::flex()).unwrap_err().to_string();
    assert!(error.contains("'visual.transformer.resblocks.4.ln_1.weight' is missing"), "{error}");
}

#[test]
fn model_dir_round_trip_and_errors() {
    let dir = std::env::temp_dir().join(format!("clip-lens-dir-{}", std::process::id()));
    let config = ClipConfig::preset("tiny").unwrap();
    write_model_dir(&dir, &config, 26, Naming::OpenAi, StorageType::F16).unwrap();
    let model = load_model_dir(&dir, &Device::flex()).unwrap();
    assert_eq!(model.config, config);

    std::fs::write(dir.join("second.safetensors"), b"x").unwrap();
    let error = load_model_dir(&dir, &Device::flex()).unwrap_err().to_string();
    assert!(error.contains("expected one .safetensors file, found 2"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();

    let error = load_model_dir(Path::new("/nonexistent/model"), &Device::flex()).unwrap_err().to_string();
    assert!(error.contains("no model config found"), "{error}");
}

#[test]
fn non_finite_weight_is_named() {
    let config = ClipConfig::preset("tiny").unwrap();
    let mut model = generate(&config, 27, Naming::OpenAi, StorageType::F32).unwrap();
    // Overwrite the first value of visual.proj with NaN, at the offset the safetensors header
    // gives (an 8-byte header length, the JSON header, then the data).
    let bytes = &mut model.safetensors;
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let start = header["visual.proj"]["data_offsets"][0].as_u64().unwrap() as usize + 8 + header_len;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());

    let error = load_clip(&model.config_json, &model.safetensors, "model.safetensors", &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(error.contains("'visual.proj' has the non-finite value NaN at flat index 0"), "{error}");
    assert!(error.contains("model.safetensors"), "{error}");
}

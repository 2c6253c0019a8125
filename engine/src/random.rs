//! Seeded random CLIP models with real CLIP shapes and tensor names, for tests, benchmarks and the
//! page's embedded default model.

use std::collections::BTreeMap;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::config::{Activation, ClipConfig};
use crate::error::{EngineError, Result};
use crate::weights::Naming;

/// Storage type of the generated weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageType {
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for StorageType {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(StorageType::F32),
            "f16" => Ok(StorageType::F16),
            "bf16" => Ok(StorageType::BF16),
            other => Err(EngineError::Input(format!(
                "unknown weight dtype '{other}'; expected f32, f16 or bf16"
            ))),
        }
    }
}

/// SplitMix64 with Box-Muller normals: small, seedable and identical on every platform.
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed ^ 0x5DEE_CE66_D1CE_4E5B }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    pub fn normal_vec(&mut self, len: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..len).map(|_| (mean + std * self.normal()) as f32).collect()
    }
}

/// One named tensor of a generated checkpoint.
struct Named {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// Generates every tensor of a CLIP model (both towers) in OpenAI naming. Standard deviations
/// follow open_clip's initialization (`width^-0.5` for attention and projections); LayerNorm
/// scales are drawn around 1 and biases around 0 so no term of the lens is trivially zero.
fn openai_tensors(config: &ClipConfig, seed: u64) -> Vec<Named> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut push = |out: &mut Vec<Named>, name: String, shape: Vec<usize>, mean: f64, std: f64| {
        let len = shape.iter().product();
        let values = rng.normal_vec(len, mean, std);
        out.push(Named { name, shape, values });
    };

    let v = &config.vision;
    let (w, p) = (v.width, v.patch_size);
    let scale = (w as f64).powf(-0.5);
    push(&mut out, "visual.conv1.weight".into(), vec![w, 3, p, p], 0.0, (3.0 * (p * p) as f64).powf(-0.5));
    push(&mut out, "visual.class_embedding".into(), vec![w], 0.0, scale);
    push(&mut out, "visual.positional_embedding".into(), vec![v.tokens(), w], 0.0, scale);
    for part in ["ln_pre", "ln_post"] {
        push(&mut out, format!("visual.{part}.weight"), vec![w], 1.0, 0.1);
        push(&mut out, format!("visual.{part}.bias"), vec![w], 0.0, 0.02);
    }
    for l in 0..v.layers {
        block_tensors(&mut out, &mut push, &format!("visual.transformer.resblocks.{l}"), w, v.mlp_dim, v.layers);
    }
    push(&mut out, "visual.proj".into(), vec![w, config.embed_dim], 0.0, scale);

    let t = &config.text;
    let tw = t.width;
    let tscale = (tw as f64).powf(-0.5);
    push(&mut out, "token_embedding.weight".into(), vec![t.vocab_size, tw], 0.0, 0.02);
    push(&mut out, "positional_embedding".into(), vec![t.context_length, tw], 0.0, 0.01);
    for l in 0..t.layers {
        block_tensors(&mut out, &mut push, &format!("transformer.resblocks.{l}"), tw, t.mlp_dim, t.layers);
    }
    push(&mut out, "ln_final.weight".into(), vec![tw], 1.0, 0.1);
    push(&mut out, "ln_final.bias".into(), vec![tw], 0.0, 0.02);
    push(&mut out, "text_projection".into(), vec![tw, config.embed_dim], 0.0, tscale);
    out.push(Named { name: "logit_scale".into(), shape: vec![], values: vec![(1.0f32 / 0.07).ln()] });
    out
}

fn block_tensors(
    out: &mut Vec<Named>,
    push: &mut impl FnMut(&mut Vec<Named>, String, Vec<usize>, f64, f64),
    prefix: &str,
    width: usize,
    mlp: usize,
    layers: usize,
) {
    let attn_std = (width as f64).powf(-0.5);
    let proj_std = attn_std * (2.0 * layers as f64).powf(-0.5);
    let fc_std = (2.0 * width as f64).powf(-0.5);
    for (name, shape, mean, std) in [
        ("ln_1.weight", vec![width], 1.0, 0.1),
        ("ln_1.bias", vec![width], 0.0, 0.02),
        ("attn.in_proj_weight", vec![3 * width, width], 0.0, attn_std),
        ("attn.in_proj_bias", vec![3 * width], 0.0, 0.02),
        ("attn.out_proj.weight", vec![width, width], 0.0, proj_std),
        ("attn.out_proj.bias", vec![width], 0.0, 0.02),
        ("ln_2.weight", vec![width], 1.0, 0.1),
        ("ln_2.bias", vec![width], 0.0, 0.02),
        ("mlp.c_fc.weight", vec![mlp, width], 0.0, fc_std),
        ("mlp.c_fc.bias", vec![mlp], 0.0, 0.02),
        ("mlp.c_proj.weight", vec![width, mlp], 0.0, proj_std),
        ("mlp.c_proj.bias", vec![width], 0.0, 0.02),
    ] {
        push(out, format!("{prefix}.{name}"), shape, mean, std);
    }
}

/// Renames OpenAI tensors to Hugging Face `CLIPModel` names, splitting the fused attention
/// projection and transposing the two embedding projections.
fn to_hugging_face(tensors: Vec<Named>) -> Vec<Named> {
    let mut out = Vec::new();
    for t in tensors {
        let name = t.name.as_str();
        let (tower, rest) = match name.strip_prefix("visual.") {
            Some(rest) => ("vision_model", rest),
            None => ("text_model", name),
        };
        let simple = |n: &str| format!("{tower}.{n}");
        match rest {
            "conv1.weight" => out.push(Named { name: simple("embeddings.patch_embedding.weight"), ..t }),
            "class_embedding" => out.push(Named { name: simple("embeddings.class_embedding"), ..t }),
            "positional_embedding" => {
                out.push(Named { name: simple("embeddings.position_embedding.weight"), ..t })
            }
            "token_embedding.weight" => {
                out.push(Named { name: simple("embeddings.token_embedding.weight"), ..t })
            }
            "proj" | "text_projection" => {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let mut values = vec![0.0; t.values.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        values[c * rows + r] = t.values[r * cols + c];
                    }
                }
                let new_name =
                    if rest == "proj" { "visual_projection.weight" } else { "text_projection.weight" };
                out.push(Named { name: new_name.into(), shape: vec![cols, rows], values });
            }
            "logit_scale" => out.push(t),
            _ => {
                let rest = rest
                    .replace("transformer.resblocks.", "encoder.layers.")
                    .replace("ln_pre.", "pre_layrnorm.")
                    .replace("ln_post.", "post_layernorm.")
                    .replace("ln_final.", "final_layer_norm.")
                    .replace(".ln_1.", ".layer_norm1.")
                    .replace(".ln_2.", ".layer_norm2.")
                    .replace(".attn.out_proj.", ".self_attn.out_proj.")
                    .replace(".mlp.c_fc.", ".mlp.fc1.")
                    .replace(".mlp.c_proj.", ".mlp.fc2.");
                if let Some(block) = rest.strip_suffix(".attn.in_proj_weight") {
                    let third = t.values.len() / 3;
                    let width = t.shape[1];
                    for (i, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                        out.push(Named {
                            name: format!("{tower}.{block}.self_attn.{part}.weight"),
                            shape: vec![width, width],
                            values: t.values[i * third..(i + 1) * third].to_vec(),
                        });
                    }
                } else if let Some(block) = rest.strip_suffix(".attn.in_proj_bias") {
                    let third = t.values.len() / 3;
                    for (i, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                        out.push(Named {
                            name: format!("{tower}.{block}.self_attn.{part}.bias"),
                            shape: vec![third],
                            values: t.values[i * third..(i + 1) * third].to_vec(),
                        });
                    }
                } else {
                    out.push(Named { name: format!("{tower}.{rest}"), ..t });
                }
            }
        }
    }
    out
}

/// Writes this configuration as a Hugging Face `CLIPConfig`.
pub fn hugging_face_config(config: &ClipConfig) -> serde_json::Value {
    let act = match config.activation {
        Activation::QuickGelu => "quick_gelu",
        Activation::Gelu => "gelu",
    };
    serde_json::json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "vision_config": {
            "image_size": config.vision.image_size,
            "patch_size": config.vision.patch_size,
            "hidden_size": config.vision.width,
            "num_hidden_layers": config.vision.layers,
            "num_attention_heads": config.vision.heads,
            "intermediate_size": config.vision.mlp_dim,
            "hidden_act": act,
            "layer_norm_eps": config.vision.layer_norm_eps,
        },
        "text_config": {
            "vocab_size": config.text.vocab_size,
            "max_position_embeddings": config.text.context_length,
            "hidden_size": config.text.width,
            "num_hidden_layers": config.text.layers,
            "num_attention_heads": config.text.heads,
            "intermediate_size": config.text.mlp_dim,
            "hidden_act": act,
            "layer_norm_eps": config.text.layer_norm_eps,
        },
    })
}

/// A generated model directory's two files.
pub struct GeneratedModel {
    pub config_json: String,
    pub safetensors: Vec<u8>,
}

/// Generates a seeded random model with the given shapes, naming and storage type.
pub fn generate(config: &ClipConfig, seed: u64, naming: Naming, dtype: StorageType) -> Result<GeneratedModel> {
    config.validate()?;
    let tensors = openai_tensors(config, seed);
    let tensors = match naming {
        Naming::OpenAi => tensors,
        Naming::HuggingFace => to_hugging_face(tensors),
    };

    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|t| {
            let bytes = match dtype {
                StorageType::F32 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                StorageType::F16 => {
                    t.values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()
                }
                StorageType::BF16 => {
                    t.values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()
                }
            };
            (t.name, t.shape, bytes)
        })
        .collect();
    let st_dtype = match dtype {
        StorageType::F32 => Dtype::F32,
        StorageType::F16 => Dtype::F16,
        StorageType::BF16 => Dtype::BF16,
    };
    let mut views = BTreeMap::new();
    for (name, shape, bytes) in &encoded {
        let view = TensorView::new(st_dtype, shape.clone(), bytes)
            .map_err(|e| EngineError::Weights(format!("cannot encode tensor '{name}': {e}")))?;
        views.insert(name.clone(), view);
    }
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("generator".to_string(), format!("clip-lens random-model, seed {seed}"));
    let safetensors = safetensors::serialize(views, &Some(metadata))
        .map_err(|e| EngineError::Weights(format!("cannot serialize weights: {e}")))?;

    let config_value = match naming {
        Naming::OpenAi => config.to_open_clip_json(),
        Naming::HuggingFace => hugging_face_config(config),
    };
    let config_json = serde_json::to_string_pretty(&config_value).expect("JSON values serialize");
    Ok(GeneratedModel { config_json, safetensors })
}

/// Generates a model and writes `config.json` and `model.safetensors` into `dir`.
pub fn write_model_dir(
    dir: &std::path::Path,
    config: &ClipConfig,
    seed: u64,
    naming: Naming,
    dtype: StorageType,
) -> Result<()> {
    let model = generate(config, seed, naming, dtype)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| EngineError::io(format!("cannot create {}", dir.display()), e))?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, model.config_json)
        .map_err(|e| EngineError::io(format!("cannot write {}", config_path.display()), e))?;
    let weights_path = dir.join("model.safetensors");
    std::fs::write(&weights_path, model.safetensors)
        .map_err(|e| EngineError::io(format!("cannot write {}", weights_path.display()), e))?;
    Ok(())
}

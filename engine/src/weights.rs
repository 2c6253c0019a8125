//! Loading CLIP weights from a safetensors file into the engine's model structs.
//!
//! Two naming schemes are accepted: OpenAI's and open_clip's state dicts (`visual.conv1.weight`,
//! `visual.transformer.resblocks.{l}.attn.in_proj_weight`, ...) and Hugging Face's `CLIPModel`
//! (`vision_model.encoder.layers.{l}.self_attn.q_proj.weight`, ...). Tensors may be stored as
//! f32, f16, bf16 or f64; they are converted to f32 one at a time, so peak memory is the file plus
//! one tensor.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::config::ClipConfig;
use crate::error::{EngineError, Result};
use crate::model::{ClipModel, LayerNorm, ResidualBlock, VisionTransformer};

/// The tensor naming scheme of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// OpenAI's and open_clip's state dicts.
    OpenAi,
    /// Hugging Face transformers' `CLIPModel`.
    HuggingFace,
}

/// Config file names tried in a model directory, in order.
pub const CONFIG_FILE_NAMES: &[&str] = &["config.json", "open_clip_config.json"];

/// A parsed safetensors file with the file name used in error messages.
pub struct WeightFile<'a> {
    tensors: SafeTensors<'a>,
    file: String,
    naming: Naming,
    /// Text before the scheme's first name, for checkpoints saved with a wrapper prefix such as
    /// `module.`.
    prefix: String,
}

impl<'a> WeightFile<'a> {
    /// Parses a safetensors buffer and detects its naming scheme.
    pub fn parse(bytes: &'a [u8], file: &str) -> Result<Self> {
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| {
            EngineError::Weights(format!(
                "{file} is not a valid safetensors file (truncated or corrupt?): {e}"
            ))
        })?;
        let mut detected = None;
        for name in tensors.names() {
            if let Some(prefix) = name.strip_suffix("visual.conv1.weight") {
                detected = Some((Naming::OpenAi, prefix.to_string()));
                break;
            }
            if let Some(prefix) = name.strip_suffix("vision_model.embeddings.patch_embedding.weight") {
                detected = Some((Naming::HuggingFace, prefix.to_string()));
                break;
            }
        }
        let (naming, prefix) = detected.ok_or_else(|| {
            EngineError::Weights(format!(
                "{file} contains no CLIP vision tower: found neither 'visual.conv1.weight' \
                 (OpenAI/open_clip naming) nor 'vision_model.embeddings.patch_embedding.weight' \
                 (Hugging Face naming) among its {} tensors",
                tensors.len()
            ))
        })?;
        Ok(WeightFile { tensors, file: file.to_string(), naming, prefix })
    }

    pub fn naming(&self) -> Naming {
        self.naming
    }

    /// Reads tensor `name` (without the wrapper prefix) as f32, checking its shape.
    pub fn read(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let view = self.tensors.tensor(&full).map_err(|_| {
            EngineError::Weights(format!(
                "{}: tensor '{full}' is missing (expected shape {expected:?})",
                self.file
            ))
        })?;
        if view.shape() != expected {
            return Err(EngineError::Weights(format!(
                "{}: tensor '{full}' has shape {:?}, expected {expected:?}",
                self.file,
                view.shape()
            )));
        }
        let bytes = view.data();
        let values = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32)
                .collect(),
            other => {
                return Err(EngineError::Weights(format!(
                    "{}: tensor '{full}' has dtype {other:?}; expected F32, F16, BF16 or F64",
                    self.file
                )))
            }
        };
        let values: Vec<f32> = values;
        // Also catches f64 values beyond f32's range, which become infinite above.
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(EngineError::Weights(format!(
                "{}: tensor '{full}' has the non-finite value {} at flat index {index}; the \
                 weights are corrupt",
                self.file, values[index]
            )));
        }
        Ok(values)
    }
}

/// Loads the vision tower of a CLIP model from a config and a safetensors buffer.
/// `source_name` names the weights in error messages (a file path or URL).
pub fn load_clip(
    config_json: &str,
    safetensors: &[u8],
    source_name: &str,
    device: &Device,
) -> Result<ClipModel> {
    let config = ClipConfig::from_json(config_json)?;
    let file = WeightFile::parse(safetensors, source_name)?;
    let vision = load_vision(&file, &config, device)?;
    Ok(ClipModel { config, vision })
}

/// Finds the config and the single safetensors file of a model directory.
pub fn model_dir_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let config = CONFIG_FILE_NAMES
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            EngineError::Weights(format!(
                "{}: no model config found (looked for {})",
                dir.display(),
                CONFIG_FILE_NAMES.join(", ")
            ))
        })?;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io(format!("cannot list {}", dir.display()), e))?;
    let mut weights: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    weights.sort();
    match weights.len() {
        1 => Ok((config, weights.remove(0))),
        0 => Err(EngineError::Weights(format!("{}: no .safetensors file found", dir.display()))),
        _ => Err(EngineError::Weights(format!(
            "{}: expected one .safetensors file, found {}: {}",
            dir.display(),
            weights.len(),
            weights.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Loads a model directory: a config (see [`CONFIG_FILE_NAMES`]) plus one `.safetensors` file.
pub fn load_model_dir(dir: &Path, device: &Device) -> Result<ClipModel> {
    let (config_path, weights_path) = model_dir_files(dir)?;
    let config_json = std::fs::read_to_string(&config_path)
        .map_err(|e| EngineError::io(format!("cannot read {}", config_path.display()), e))?;
    let bytes = std::fs::read(&weights_path)
        .map_err(|e| EngineError::io(format!("cannot read {}", weights_path.display()), e))?;
    let config = ClipConfig::from_json(&config_json)
        .map_err(|e| e.in_file(&config_path))?;
    let file = WeightFile::parse(&bytes, &weights_path.display().to_string())?;
    let vision = load_vision(&file, &config, device)?;
    Ok(ClipModel { config, vision })
}

/// Row-major `[rows, cols]` to `[cols, rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// A reader of a weight file's tensors into device tensors, checking their shapes; shared by
/// the vision and text towers.
pub(crate) struct Loader<'f, 'a> {
    file: &'f WeightFile<'a>,
    device: &'f Device,
}

impl<'f, 'a> Loader<'f, 'a> {
    pub(crate) fn new(file: &'f WeightFile<'a>, device: &'f Device) -> Self {
        Loader { file, device }
    }

    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Tensor<1>> {
        let values = self.file.read(name, &[len])?;
        Ok(Tensor::from_data(TensorData::new(values, [len]), self.device))
    }

    pub(crate) fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>> {
        let values = self.file.read(name, &[rows, cols])?;
        Ok(Tensor::from_data(TensorData::new(values, [rows, cols]), self.device))
    }

    /// Reads a PyTorch `Linear` weight `[out, in]` and returns it as `[in, out]`.
    pub(crate) fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Tensor<2>> {
        let values = transpose(&self.file.read(name, &[out, inp])?, out, inp);
        Ok(Tensor::from_data(TensorData::new(values, [inp, out]), self.device))
    }

    pub(crate) fn layer_norm(&self, prefix: &str, width: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.vector(&format!("{prefix}.weight"), width)?,
            bias: self.vector(&format!("{prefix}.bias"), width)?,
            eps,
        })
    }
}

fn load_vision(file: &WeightFile, config: &ClipConfig, device: &Device) -> Result<VisionTransformer> {
    let vision = &config.vision;
    let (width, mlp, eps) = (vision.width, vision.mlp_dim, vision.layer_norm_eps);
    let patch = vision.patch_size;
    let loader = Loader { file, device };

    let (conv, class, positional, ln_pre, ln_post) = match file.naming {
        Naming::OpenAi => (
            "visual.conv1.weight",
            "visual.class_embedding",
            "visual.positional_embedding",
            "visual.ln_pre",
            "visual.ln_post",
        ),
        Naming::HuggingFace => (
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.class_embedding",
            "vision_model.embeddings.position_embedding.weight",
            "vision_model.pre_layrnorm",
            "vision_model.post_layernorm",
        ),
    };

    // The convolution kernel [D, 3, p, p] is the transpose of the patch matrix [3pp, D].
    let conv_values = file.read(conv, &[width, 3, patch, patch])?;
    let patch_weight = Tensor::from_data(
        TensorData::new(transpose(&conv_values, width, 3 * patch * patch), [3 * patch * patch, width]),
        device,
    );
    let class_embedding = loader.vector(class, width)?;
    let positional_embedding = loader.matrix(positional, vision.tokens(), width)?;
    let ln_pre = loader.layer_norm(ln_pre, width, eps)?;
    let ln_post = loader.layer_norm(ln_post, width, eps)?;
    let projection = match file.naming {
        Naming::OpenAi => loader.matrix("visual.proj", width, config.embed_dim)?,
        Naming::HuggingFace => loader.linear("visual_projection.weight", config.embed_dim, width)?,
    };

    let mut blocks = Vec::with_capacity(vision.layers);
    for l in 0..vision.layers {
        let block = match file.naming {
            Naming::OpenAi => {
                let p = format!("visual.transformer.resblocks.{l}");
                ResidualBlock {
                    ln1: loader.layer_norm(&format!("{p}.ln_1"), width, eps)?,
                    qkv_weight: loader.linear(&format!("{p}.attn.in_proj_weight"), 3 * width, width)?,
                    qkv_bias: loader.vector(&format!("{p}.attn.in_proj_bias"), 3 * width)?,
                    out_weight: loader.linear(&format!("{p}.attn.out_proj.weight"), width, width)?,
                    out_bias: loader.vector(&format!("{p}.attn.out_proj.bias"), width)?,
                    ln2: loader.layer_norm(&format!("{p}.ln_2"), width, eps)?,
                    mlp_in_weight: loader.linear(&format!("{p}.mlp.c_fc.weight"), mlp, width)?,
                    mlp_in_bias: loader.vector(&format!("{p}.mlp.c_fc.bias"), mlp)?,
                    mlp_out_weight: loader.linear(&format!("{p}.mlp.c_proj.weight"), width, mlp)?,
                    mlp_out_bias: loader.vector(&format!("{p}.mlp.c_proj.bias"), width)?,
                }
            }
            Naming::HuggingFace => {
                let p = format!("vision_model.encoder.layers.{l}");
                // Hugging Face keeps q, k and v apart; fuse them as [D, 3D] with columns q, k, v.
                let q = loader.linear(&format!("{p}.self_attn.q_proj.weight"), width, width)?;
                let k = loader.linear(&format!("{p}.self_attn.k_proj.weight"), width, width)?;
                let v = loader.linear(&format!("{p}.self_attn.v_proj.weight"), width, width)?;
                let qb = loader.vector(&format!("{p}.self_attn.q_proj.bias"), width)?;
                let kb = loader.vector(&format!("{p}.self_attn.k_proj.bias"), width)?;
                let vb = loader.vector(&format!("{p}.self_attn.v_proj.bias"), width)?;
                ResidualBlock {
                    ln1: loader.layer_norm(&format!("{p}.layer_norm1"), width, eps)?,
                    qkv_weight: Tensor::cat(vec![q, k, v], 1),
                    qkv_bias: Tensor::cat(vec![qb, kb, vb], 0),
                    out_weight: loader.linear(&format!("{p}.self_attn.out_proj.weight"), width, width)?,
                    out_bias: loader.vector(&format!("{p}.self_attn.out_proj.bias"), width)?,
                    ln2: loader.layer_norm(&format!("{p}.layer_norm2"), width, eps)?,
                    mlp_in_weight: loader.linear(&format!("{p}.mlp.fc1.weight"), mlp, width)?,
                    mlp_in_bias: loader.vector(&format!("{p}.mlp.fc1.bias"), mlp)?,
                    mlp_out_weight: loader.linear(&format!("{p}.mlp.fc2.weight"), width, mlp)?,
                    mlp_out_bias: loader.vector(&format!("{p}.mlp.fc2.bias"), width)?,
                }
            }
        };
        blocks.push(block);
    }

    Ok(VisionTransformer {
        config: vision.clone(),
        activation: config.activation,
        patch_weight,
        class_embedding,
        positional_embedding,
        ln_pre,
        blocks,
        ln_post,
        projection,
    })
}

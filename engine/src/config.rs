//! Model configurations: named presets and readers for the two published config formats
//! (open_clip's model configs and Hugging Face's `CLIPConfig`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{EngineError, Result};

/// MLP nonlinearity of a CLIP tower.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `z * sigmoid(1.702 z)`, used by OpenAI's original weights.
    QuickGelu,
    /// The exact, erf-based GELU used by most LAION/open_clip weights.
    Gelu,
}

/// Shape of the vision transformer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    /// Residual width D.
    pub width: usize,
    /// Number of residual blocks L.
    pub layers: usize,
    pub heads: usize,
    /// MLP neurons per block N.
    pub mlp_dim: usize,
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    /// Patches per side of the input grid.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image: the class token plus one per patch.
    pub fn tokens(&self) -> usize {
        self.grid_size() * self.grid_size() + 1
    }

    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }
}

/// Shape of the text transformer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub context_length: usize,
    pub vocab_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_dim: usize,
    pub layer_norm_eps: f64,
}

/// A whole CLIP model: both towers, the joint embedding width and the activation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    /// Joint image-text embedding width d.
    pub embed_dim: usize,
    pub activation: Activation,
    pub vision: VisionConfig,
    pub text: TextConfig,
}

/// Names accepted by [`ClipConfig::preset`].
pub const PRESETS: &[&str] = &["ViT-B-32", "ViT-B-16", "ViT-L-14", "tiny", "small"];

impl ClipConfig {
    /// Returns the configuration of a named preset. The first three follow open_clip's model
    /// configs of the same names (with OpenAI's QuickGELU); `tiny` is for unit tests and `small`
    /// is the page's embedded default.
    pub fn preset(name: &str) -> Result<Self> {
        let text_b = TextConfig {
            context_length: 77,
            vocab_size: 49408,
            width: 512,
            layers: 12,
            heads: 8,
            mlp_dim: 2048,
            layer_norm_eps: 1e-5,
        };
        let vision = |image_size, patch_size, width, layers, heads| VisionConfig {
            image_size,
            patch_size,
            width,
            layers,
            heads,
            mlp_dim: 4 * width,
            layer_norm_eps: 1e-5,
        };
        let config = match name {
            "ViT-B-32" => ClipConfig {
                embed_dim: 512,
                activation: Activation::QuickGelu,
                vision: vision(224, 32, 768, 12, 12),
                text: text_b,
            },
            "ViT-B-16" => ClipConfig {
                embed_dim: 512,
                activation: Activation::QuickGelu,
                vision: vision(224, 16, 768, 12, 12),
                text: text_b,
            },
            "ViT-L-14" => ClipConfig {
                embed_dim: 768,
                activation: Activation::QuickGelu,
                vision: vision(224, 14, 1024, 24, 16),
                text: TextConfig { width: 768, heads: 12, mlp_dim: 3072, ..text_b },
            },
            "tiny" => ClipConfig {
                embed_dim: 24,
                activation: Activation::QuickGelu,
                vision: vision(32, 8, 32, 4, 4),
                text: TextConfig {
                    context_length: 77,
                    vocab_size: 49408,
                    width: 32,
                    layers: 2,
                    heads: 4,
                    mlp_dim: 128,
                    layer_norm_eps: 1e-5,
                },
            },
            "small" => ClipConfig {
                embed_dim: 128,
                activation: Activation::QuickGelu,
                vision: vision(224, 32, 128, 6, 4),
                text: TextConfig {
                    context_length: 77,
                    vocab_size: 49408,
                    width: 128,
                    layers: 4,
                    heads: 4,
                    mlp_dim: 512,
                    layer_norm_eps: 1e-5,
                },
            },
            other => {
                return Err(EngineError::Config(format!(
                    "unknown preset '{other}'; known presets: {}",
                    PRESETS.join(", ")
                )))
            }
        };
        Ok(config)
    }

    /// Parses a `config.json` in any of the accepted layouts: an open_clip model config
    /// (`embed_dim`, `vision_cfg`, `text_cfg`), an `open_clip_config.json` (the same under
    /// `model_cfg`), or a Hugging Face `CLIPConfig` (`vision_config`, `text_config`).
    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| EngineError::Config(format!("config is not valid JSON: {e}")))?;
        if let Some(model_cfg) = value.get("model_cfg") {
            return Self::from_open_clip(model_cfg);
        }
        if value.get("vision_cfg").is_some() {
            return Self::from_open_clip(&value);
        }
        if value.get("vision_config").is_some() {
            return Self::from_hugging_face(&value);
        }
        Err(EngineError::Config(
            "config has neither 'vision_cfg' (open_clip), 'model_cfg' (open_clip_config.json) \
             nor 'vision_config' (Hugging Face CLIPConfig)"
                .into(),
        ))
    }

    /// Reads an open_clip model config (`ViT-B-32.json` and the like).
    pub fn from_open_clip(value: &Value) -> Result<Self> {
        let embed_dim = required_usize(value, "embed_dim", "")?;
        let vision_cfg = value
            .get("vision_cfg")
            .ok_or_else(|| EngineError::Config("open_clip config has no 'vision_cfg'".into()))?;
        let text_cfg = value
            .get("text_cfg")
            .ok_or_else(|| EngineError::Config("open_clip config has no 'text_cfg'".into()))?;
        let quick_gelu = value.get("quick_gelu").and_then(Value::as_bool).unwrap_or(false);

        let width = required_usize(vision_cfg, "width", "vision_cfg.")?;
        let head_width = optional_usize(vision_cfg, "head_width", "vision_cfg.")?.unwrap_or(64);
        let mlp_ratio = vision_cfg.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0);
        let vision = VisionConfig {
            image_size: required_usize(vision_cfg, "image_size", "vision_cfg.")?,
            patch_size: required_usize(vision_cfg, "patch_size", "vision_cfg.")?,
            width,
            layers: required_usize(vision_cfg, "layers", "vision_cfg.")?,
            heads: heads_from(width, head_width, "vision_cfg")?,
            mlp_dim: (width as f64 * mlp_ratio).round() as usize,
            layer_norm_eps: 1e-5,
        };

        let text_width = required_usize(text_cfg, "width", "text_cfg.")?;
        let text_mlp_ratio = text_cfg.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0);
        let text = TextConfig {
            context_length: optional_usize(text_cfg, "context_length", "text_cfg.")?.unwrap_or(77),
            vocab_size: optional_usize(text_cfg, "vocab_size", "text_cfg.")?.unwrap_or(49408),
            width: text_width,
            layers: required_usize(text_cfg, "layers", "text_cfg.")?,
            heads: optional_usize(text_cfg, "heads", "text_cfg.")?.unwrap_or(8),
            mlp_dim: (text_width as f64 * text_mlp_ratio).round() as usize,
            layer_norm_eps: 1e-5,
        };

        let activation = if quick_gelu { Activation::QuickGelu } else { Activation::Gelu };
        let config = ClipConfig { embed_dim, activation, vision, text };
        config.validate()?;
        Ok(config)
    }

    /// Reads a Hugging Face `CLIPConfig` (`config.json` of `openai/clip-vit-base-patch32`).
    pub fn from_hugging_face(value: &Value) -> Result<Self> {
        let vision_cfg = value
            .get("vision_config")
            .ok_or_else(|| EngineError::Config("CLIPConfig has no 'vision_config'".into()))?;
        let text_cfg = value.get("text_config").cloned().unwrap_or(Value::Null);
        let embed_dim = optional_usize(value, "projection_dim", "")?.unwrap_or(512);

        // Hugging Face's CLIPVisionConfig defaults, used when a key is absent.
        let vision = VisionConfig {
            image_size: optional_usize(vision_cfg, "image_size", "vision_config.")?.unwrap_or(224),
            patch_size: optional_usize(vision_cfg, "patch_size", "vision_config.")?.unwrap_or(32),
            width: optional_usize(vision_cfg, "hidden_size", "vision_config.")?.unwrap_or(768),
            layers: optional_usize(vision_cfg, "num_hidden_layers", "vision_config.")?
                .unwrap_or(12),
            heads: optional_usize(vision_cfg, "num_attention_heads", "vision_config.")?
                .unwrap_or(12),
            mlp_dim: optional_usize(vision_cfg, "intermediate_size", "vision_config.")?
                .unwrap_or(3072),
            layer_norm_eps: vision_cfg
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-5),
        };
        let text = TextConfig {
            context_length: optional_usize(&text_cfg, "max_position_embeddings", "text_config.")?
                .unwrap_or(77),
            vocab_size: optional_usize(&text_cfg, "vocab_size", "text_config.")?.unwrap_or(49408),
            width: optional_usize(&text_cfg, "hidden_size", "text_config.")?.unwrap_or(512),
            layers: optional_usize(&text_cfg, "num_hidden_layers", "text_config.")?.unwrap_or(12),
            heads: optional_usize(&text_cfg, "num_attention_heads", "text_config.")?.unwrap_or(8),
            mlp_dim: optional_usize(&text_cfg, "intermediate_size", "text_config.")?
                .unwrap_or(2048),
            layer_norm_eps: text_cfg.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-5),
        };
        let act = vision_cfg.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu");
        let activation = match act {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(EngineError::Config(format!(
                    "vision_config.hidden_act '{other}' is not supported; expected 'quick_gelu' or 'gelu'"
                )))
            }
        };
        let config = ClipConfig { embed_dim, activation, vision, text };
        config.validate()?;
        Ok(config)
    }

    /// Writes this configuration as an open_clip model config (the format `random-model` emits).
    pub fn to_open_clip_json(&self) -> Value {
        serde_json::json!({
            "embed_dim": self.embed_dim,
            "quick_gelu": self.activation == Activation::QuickGelu,
            "vision_cfg": {
                "image_size": self.vision.image_size,
                "layers": self.vision.layers,
                "width": self.vision.width,
                "head_width": self.vision.head_dim(),
                "mlp_ratio": self.vision.mlp_dim as f64 / self.vision.width as f64,
                "patch_size": self.vision.patch_size,
            },
            "text_cfg": {
                "context_length": self.text.context_length,
                "vocab_size": self.text.vocab_size,
                "width": self.text.width,
                "heads": self.text.heads,
                "layers": self.text.layers,
                "mlp_ratio": self.text.mlp_dim as f64 / self.text.width as f64,
            },
        })
    }

    /// Checks the shape relations the model code relies on.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision;
        let fail = |msg: String| Err(EngineError::Config(msg));
        if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
            return fail(format!(
                "vision image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.heads == 0 || v.width % v.heads != 0 {
            return fail(format!("vision width {} is not a multiple of heads {}", v.width, v.heads));
        }
        if v.layers == 0 || v.mlp_dim == 0 || self.embed_dim == 0 {
            return fail("vision layers, MLP width and embed_dim must be positive".into());
        }
        let t = &self.text;
        if t.heads == 0 || t.width % t.heads != 0 {
            return fail(format!("text width {} is not a multiple of heads {}", t.width, t.heads));
        }
        // A bound that no published CLIP comes near; it stops a hostile config from asking for
        // terabytes before a single weight is read.
        let params = v.layers as u128 * (4 * v.width * v.width + 2 * v.width * v.mlp_dim) as u128;
        if params > 4_000_000_000 {
            return fail(format!("vision tower of {params} parameters is larger than supported"));
        }
        Ok(())
    }
}

fn optional_usize(value: &Value, key: &str, prefix: &str) -> Result<Option<usize>> {
    match value.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            EngineError::Config(format!("'{prefix}{key}' should be a non-negative integer, found {v}"))
        }),
    }
}

fn required_usize(value: &Value, key: &str, prefix: &str) -> Result<usize> {
    optional_usize(value, key, prefix)?
        .ok_or_else(|| EngineError::Config(format!("config is missing '{prefix}{key}'")))
}

fn heads_from(width: usize, head_width: usize, section: &str) -> Result<usize> {
    if head_width == 0 || width % head_width != 0 {
        return Err(EngineError::Config(format!(
            "{section}.width {width} is not a multiple of head_width {head_width}"
        )));
    }
    Ok(width / head_width)
}

//! The CLIP vision transformer in OpenAI's architecture, with a forward pass that can keep the
//! quantities the second-order lens needs.
//!
//! Layout conventions: activations are `[batch, tokens, width]` with the class token at index 0
//! and the patches after it in row-major order. Weight matrices are stored transposed
//! (`[in, out]`) so that every linear map is a plain `x.matmul(w)`.

use std::collections::BTreeMap;

use burn::tensor::activation::{gelu, sigmoid, softmax};
use burn::tensor::{Device, Tensor};

use crate::config::{Activation, ClipConfig, VisionConfig};
use crate::error::{EngineError, Result};

/// A LayerNorm over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
    pub eps: f64,
}

/// Output of a LayerNorm together with the statistics it used, both with the normalized
/// dimension kept as size 1.
pub struct LayerNormOutput<const D: usize> {
    pub output: Tensor<D>,
    pub mean: Tensor<D>,
    /// `sqrt(var + eps)` with the biased variance, as PyTorch's LayerNorm computes it.
    pub scale: Tensor<D>,
}

impl LayerNorm {
    pub fn forward_with_stats<const D: usize>(&self, x: Tensor<D>) -> LayerNormOutput<D> {
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let scale = var.add_scalar(self.eps).sqrt();
        let normalized = (x - mean.clone()) / scale.clone();
        let output = normalized * self.weight.clone().unsqueeze::<D>()
            + self.bias.clone().unsqueeze::<D>();
        LayerNormOutput { output, mean, scale }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_with_stats(x).output
    }
}

/// One pre-LayerNorm residual block: `x += Attn(LN1(x))`, then `x += MLP(LN2(x))`.
#[derive(Clone, Debug)]
pub struct ResidualBlock {
    pub ln1: LayerNorm,
    /// Fused query, key and value projection, `[D, 3D]` (columns: q, then k, then v).
    pub qkv_weight: Tensor<2>,
    pub qkv_bias: Tensor<1>,
    /// Attention output projection `W_O`, `[D, D]`.
    pub out_weight: Tensor<2>,
    pub out_bias: Tensor<1>,
    pub ln2: LayerNorm,
    /// MLP input projection `W_in`, `[D, N]`.
    pub mlp_in_weight: Tensor<2>,
    pub mlp_in_bias: Tensor<1>,
    /// MLP output projection `W_out`, `[N, D]`: row n is the neuron's output direction `w_n`.
    pub mlp_out_weight: Tensor<2>,
    pub mlp_out_bias: Tensor<1>,
}

/// CLIP's image tower.
#[derive(Clone, Debug)]
pub struct VisionTransformer {
    pub config: VisionConfig,
    pub activation: Activation,
    /// Patch embedding as a matrix `[3 p p, D]` over patches flattened in (channel, row, column)
    /// order; equivalent to OpenAI's bias-free stride-p convolution `conv1`.
    pub patch_weight: Tensor<2>,
    pub class_embedding: Tensor<1>,
    /// `[T, D]`.
    pub positional_embedding: Tensor<2>,
    pub ln_pre: LayerNorm,
    pub blocks: Vec<ResidualBlock>,
    pub ln_post: LayerNorm,
    /// Projection `P` into the joint embedding, `[D, d]`.
    pub projection: Tensor<2>,
}

/// A loaded CLIP model. The text tower is loaded separately when a consumer needs it.
#[derive(Clone, Debug)]
pub struct ClipModel {
    pub config: ClipConfig,
    pub vision: VisionTransformer,
}

/// The quantities a forward pass records besides the embedding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordOptions {
    /// Blocks whose MLP post-activations are kept.
    pub mlp_post_layers: Vec<usize>,
    /// Keep the LayerNorm statistics and class-token attention rows of every block and the
    /// LN_post statistics, which the second-order lens needs.
    pub lens: bool,
}

impl RecordOptions {
    /// Records everything, for every block.
    pub fn all(config: &VisionConfig) -> Self {
        RecordOptions { mlp_post_layers: (0..config.layers).collect(), lens: true }
    }

    /// Records what the lens needs for the given source blocks.
    pub fn lens(layers: &[usize]) -> Self {
        RecordOptions { mlp_post_layers: layers.to_vec(), lens: true }
    }
}

/// Quantities kept during a forward pass. Names follow TransformerLens hook points where one
/// exists (`blocks.{l}.mlp.hook_post`, `blocks.{l}.ln1.hook_scale`, `blocks.{l}.attn.hook_pattern`).
#[derive(Clone, Debug)]
pub struct Recording {
    /// `blocks.{l}.mlp.hook_post`: post-activation MLP values `[B, T, N]` of the requested blocks.
    pub mlp_post: BTreeMap<usize, Tensor<3>>,
    /// Mean of LN1's input per block, `[B, T]` (empty unless `lens` was requested).
    pub ln1_mean: Vec<Tensor<2>>,
    /// `blocks.{l}.ln1.hook_scale`: `sqrt(var + eps)` of LN1's input per block, `[B, T]`.
    pub ln1_scale: Vec<Tensor<2>>,
    /// Row 0 of `blocks.{l}.attn.hook_pattern`: the class token's attention weights per head,
    /// `[B, H, T]`.
    pub attn_class: Vec<Tensor<3>>,
    /// Mean and `sqrt(var + eps)` of LN_post's input on the class token, `[B]`.
    pub ln_post_mean: Option<Tensor<1>>,
    pub ln_post_scale: Option<Tensor<1>>,
}

/// Result of [`VisionTransformer::forward`].
#[derive(Clone, Debug)]
pub struct VisionOutput {
    /// Unnormalized image embedding `r`, `[B, d]`.
    pub embedding: Tensor<2>,
    pub recording: Option<Recording>,
}

impl VisionTransformer {
    pub fn device(&self) -> Device {
        self.projection.device()
    }

    /// Runs the tower on CLIP-normalized pixels `[B, 3, S, S]`.
    pub fn forward(&self, pixels: Tensor<4>, record: &RecordOptions) -> VisionOutput {
        let config = &self.config;
        let [batch, _, _, _] = pixels.dims();
        let (grid, patch, width) = (config.grid_size(), config.patch_size, config.width);
        let keep = record.lens || !record.mlp_post_layers.is_empty();

        // Cut the image into patches: [B, 3, G, p, G, p] -> [B, G, G, 3, p, p] -> [B, G*G, 3pp].
        let patches = pixels
            .reshape([batch, 3, grid, patch, grid, patch])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([batch, grid * grid, 3 * patch * patch]);
        let patches = patches.matmul(self.patch_weight.clone().unsqueeze::<3>());
        let class = self.class_embedding.clone().reshape([1, 1, width]).expand([batch, 1, width]);
        let x = Tensor::cat(vec![class, patches], 1)
            + self.positional_embedding.clone().unsqueeze::<3>();
        let mut x = self.ln_pre.forward(x);

        let mut recording = Recording {
            mlp_post: BTreeMap::new(),
            ln1_mean: Vec::new(),
            ln1_scale: Vec::new(),
            attn_class: Vec::new(),
            ln_post_mean: None,
            ln_post_scale: None,
        };
        for (index, block) in self.blocks.iter().enumerate() {
            let keep_mlp = record.mlp_post_layers.contains(&index);
            x = self.forward_block(block, x, record.lens, keep_mlp, &mut recording, index);
        }

        let class_token = x.narrow(1, 0, 1).reshape([batch, width]);
        let ln_post = self.ln_post.forward_with_stats(class_token);
        let embedding = ln_post.output.matmul(self.projection.clone());
        if record.lens {
            recording.ln_post_mean = Some(ln_post.mean.reshape([batch]));
            recording.ln_post_scale = Some(ln_post.scale.reshape([batch]));
        }
        VisionOutput { embedding, recording: keep.then_some(recording) }
    }

    fn forward_block(
        &self,
        block: &ResidualBlock,
        x: Tensor<3>,
        keep_lens: bool,
        keep_mlp: bool,
        recording: &mut Recording,
        index: usize,
    ) -> Tensor<3> {
        let [batch, tokens, width] = x.dims();
        let heads = self.config.heads;
        let head_dim = width / heads;

        let ln1 = block.ln1.forward_with_stats(x.clone());
        if keep_lens {
            recording.ln1_mean.push(ln1.mean.reshape([batch, tokens]));
            recording.ln1_scale.push(ln1.scale.reshape([batch, tokens]));
        }
        let qkv = ln1.output.matmul(block.qkv_weight.clone().unsqueeze::<3>())
            + block.qkv_bias.clone().unsqueeze::<3>();
        let split = |part: usize| {
            qkv.clone()
                .narrow(2, part * width, width)
                .reshape([batch, tokens, heads, head_dim])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (head_dim as f64).sqrt());
        let pattern = softmax(scores, 3);
        if keep_lens {
            recording
                .attn_class
                .push(pattern.clone().narrow(2, 0, 1).reshape([batch, heads, tokens]));
        }
        let attended = pattern.matmul(v).swap_dims(1, 2).reshape([batch, tokens, width]);
        let attn_out = attended.matmul(block.out_weight.clone().unsqueeze::<3>())
            + block.out_bias.clone().unsqueeze::<3>();
        let x = x + attn_out;

        let hidden = block.ln2.forward(x.clone()).matmul(block.mlp_in_weight.clone().unsqueeze::<3>())
            + block.mlp_in_bias.clone().unsqueeze::<3>();
        let post = apply_activation(self.activation, hidden);
        if keep_mlp {
            recording.mlp_post.insert(index, post.clone());
        }
        let mlp_out = post.matmul(block.mlp_out_weight.clone().unsqueeze::<3>())
            + block.mlp_out_bias.clone().unsqueeze::<3>();
        x + mlp_out
    }

    /// Builds a `[B, 3, S, S]` input tensor from `batch` CLIP-normalized images laid end to end.
    pub fn input_tensor(&self, pixels: Vec<f32>, batch: usize) -> Result<Tensor<4>> {
        let size = self.config.image_size;
        let expected = batch * 3 * size * size;
        if pixels.len() != expected {
            return Err(EngineError::Input(format!(
                "expected {batch} images of 3 x {size} x {size} = {expected} values, found {}",
                pixels.len()
            )));
        }
        Ok(Tensor::from_data(
            burn::tensor::TensorData::new(pixels, [batch, 3, size, size]),
            &self.device(),
        ))
    }
}

/// The MLP nonlinearity, as the checkpoint's config names it.
pub fn apply_activation<const D: usize>(activation: Activation, x: Tensor<D>) -> Tensor<D> {
    match activation {
        Activation::QuickGelu => x.clone() * sigmoid(x.mul_scalar(1.702)),
        Activation::Gelu => gelu(x),
    }
}

//! CLIP's text transformer: token and positional embeddings, pre-LayerNorm residual blocks with
//! causal self-attention, a final LayerNorm, and the projection into the joint embedding, read at
//! the end-of-text token.
//!
//! The tower pools where the token id is largest (open_clip's `text.argmax(dim=-1)`, and Hugging
//! Face's `CLIPTextTransformer` for configs with `eos_token_id` 2), which is the end-of-text id
//! 49407 for CLIP's tokenizer; ties go to the first position, as in `torch.argmax`. Attention is
//! causal, so the output at that position does not depend on any later token. [`TextTransformer::embed`]
//! therefore cuts each sequence right after it and runs sequences of similar length together,
//! which gives the same embedding as the 77-token computation ([`TextTransformer::embed_full`])
//! at a fraction of the cost: a single word is 3 tokens long.

use std::path::Path;

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::{Activation, ClipConfig, TextConfig};
use crate::error::{EngineError, Result};
use crate::model::{apply_activation, LayerNorm, ResidualBlock};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{model_dir_files, Loader, Naming, WeightFile};

/// Sequences per forward pass in [`TextTransformer::embed`].
pub const DEFAULT_BATCH_SIZE: usize = 256;

/// Added to the attention scores of later positions. Finite, so that no backend has to handle
/// infinities, and large enough that their softmax weight is exactly zero in f32.
const MASKED_SCORE: f32 = -1e9;

/// CLIP's text tower.
#[derive(Clone, Debug)]
pub struct TextTransformer {
    pub config: TextConfig,
    pub activation: Activation,
    /// `[V, W]`: row v is the embedding of token id v.
    pub token_embedding: Tensor<2>,
    /// `[C, W]` for the context length C.
    pub positional_embedding: Tensor<2>,
    pub blocks: Vec<ResidualBlock>,
    pub ln_final: LayerNorm,
    /// Projection into the joint embedding, `[W, d]`.
    pub projection: Tensor<2>,
}

/// Loads the text tower from a parsed weight file in either naming.
pub fn load_text(file: &WeightFile, config: &ClipConfig, device: &Device) -> Result<TextTransformer> {
    let text = &config.text;
    let (width, mlp, eps) = (text.width, text.mlp_dim, text.layer_norm_eps);
    let load = Loader::new(file, device);

    let naming = file.naming();
    let (token, positional, ln_final) = match naming {
        Naming::OpenAi => ("token_embedding.weight", "positional_embedding", "ln_final"),
        Naming::HuggingFace => (
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.final_layer_norm",
        ),
    };
    let token_embedding = load.matrix(token, text.vocab_size, width)?;
    let positional_embedding = load.matrix(positional, text.context_length, width)?;
    let ln_final = load.layer_norm(ln_final, width, eps)?;
    let projection = match naming {
        Naming::OpenAi => load.matrix("text_projection", width, config.embed_dim)?,
        Naming::HuggingFace => load.linear("text_projection.weight", config.embed_dim, width)?,
    };

    let mut blocks = Vec::with_capacity(text.layers);
    for l in 0..text.layers {
        let block = match naming {
            Naming::OpenAi => {
                let p = format!("transformer.resblocks.{l}");
                ResidualBlock {
                    ln1: load.layer_norm(&format!("{p}.ln_1"), width, eps)?,
                    qkv_weight: load.linear(&format!("{p}.attn.in_proj_weight"), 3 * width, width)?,
                    qkv_bias: load.vector(&format!("{p}.attn.in_proj_bias"), 3 * width)?,
                    out_weight: load.linear(&format!("{p}.attn.out_proj.weight"), width, width)?,
                    out_bias: load.vector(&format!("{p}.attn.out_proj.bias"), width)?,
                    ln2: load.layer_norm(&format!("{p}.ln_2"), width, eps)?,
                    mlp_in_weight: load.linear(&format!("{p}.mlp.c_fc.weight"), mlp, width)?,
                    mlp_in_bias: load.vector(&format!("{p}.mlp.c_fc.bias"), mlp)?,
                    mlp_out_weight: load.linear(&format!("{p}.mlp.c_proj.weight"), width, mlp)?,
                    mlp_out_bias: load.vector(&format!("{p}.mlp.c_proj.bias"), width)?,
                }
            }
            Naming::HuggingFace => {
                let p = format!("text_model.encoder.layers.{l}");
                // Fuse q, k and v as [W, 3W] with columns q, k, v, like OpenAI's in_proj.
                let attn = |part: &str, what: &str| format!("{p}.self_attn.{part}_proj.{what}");
                let q = load.linear(&attn("q", "weight"), width, width)?;
                let k = load.linear(&attn("k", "weight"), width, width)?;
                let v = load.linear(&attn("v", "weight"), width, width)?;
                let qb = load.vector(&attn("q", "bias"), width)?;
                let kb = load.vector(&attn("k", "bias"), width)?;
                let vb = load.vector(&attn("v", "bias"), width)?;
                ResidualBlock {
                    ln1: load.layer_norm(&format!("{p}.layer_norm1"), width, eps)?,
                    qkv_weight: Tensor::cat(vec![q, k, v], 1),
                    qkv_bias: Tensor::cat(vec![qb, kb, vb], 0),
                    out_weight: load.linear(&attn("out", "weight"), width, width)?,
                    out_bias: load.vector(&attn("out", "bias"), width)?,
                    ln2: load.layer_norm(&format!("{p}.layer_norm2"), width, eps)?,
                    mlp_in_weight: load.linear(&format!("{p}.mlp.fc1.weight"), mlp, width)?,
                    mlp_in_bias: load.vector(&format!("{p}.mlp.fc1.bias"), mlp)?,
                    mlp_out_weight: load.linear(&format!("{p}.mlp.fc2.weight"), width, mlp)?,
                    mlp_out_bias: load.vector(&format!("{p}.mlp.fc2.bias"), width)?,
                }
            }
        };
        blocks.push(block);
    }

    Ok(TextTransformer {
        config: text.clone(),
        activation: config.activation,
        token_embedding,
        positional_embedding,
        blocks,
        ln_final,
        projection,
    })
}

/// Loads the text tower of a model directory: a config plus one `.safetensors` file, as
/// [`crate::weights::load_model_dir`] reads them.
pub fn load_text_from_dir(dir: &Path, device: &Device) -> Result<TextTransformer> {
    let (config_path, weights_path) = model_dir_files(dir)?;
    let config_json = std::fs::read_to_string(&config_path)
        .map_err(|e| EngineError::io(format!("cannot read {}", config_path.display()), e))?;
    let config = ClipConfig::from_json(&config_json)
        .map_err(|e| e.in_file(&config_path))?;
    let bytes = std::fs::read(&weights_path)
        .map_err(|e| EngineError::io(format!("cannot read {}", weights_path.display()), e))?;
    let file = WeightFile::parse(&bytes, &weights_path.display().to_string())?;
    load_text(&file, &config, device)
}

impl TextTransformer {
    pub fn device(&self) -> Device {
        self.projection.device()
    }

    /// Width d of the joint embedding.
    pub fn embed_dim(&self) -> usize {
        self.projection.dims()[1]
    }

    /// Returns the unnormalized text embeddings `[B, d]` of B token sequences, each a start id,
    /// word ids and an end id, with or without zero padding after it (as [`ClipTokenizer`] or
    /// `open_clip.tokenize` produce them). Runs at most [`DEFAULT_BATCH_SIZE`] sequences at a
    /// time; see [`embed_batched`](Self::embed_batched).
    pub fn embed(&self, tokens: &[Vec<u32>]) -> Result<Tensor<2>> {
        self.embed_batched(tokens, DEFAULT_BATCH_SIZE)
    }

    /// [`embed`](Self::embed) with up to `batch_size` sequences per forward pass.
    ///
    /// Each sequence is cut right after its pooling position (its largest id). The sequences are
    /// sorted by that length and run in batches, each padded with zeros to the longest sequence
    /// in it; causal attention keeps the padding from changing the pooled outputs. Peak memory
    /// is one batch of `batch_size` x longest length x W activations plus the attention scores.
    pub fn embed_batched(&self, tokens: &[Vec<u32>], batch_size: usize) -> Result<Tensor<2>> {
        if batch_size == 0 {
            return Err(EngineError::Input("text batch size must be at least 1".into()));
        }
        let pooled: Vec<usize> =
            tokens.iter().enumerate().map(|(i, seq)| self.pooling_position(i, seq)).collect::<Result<_>>()?;
        if tokens.is_empty() {
            return Ok(Tensor::zeros([0, self.embed_dim()], &self.device()));
        }

        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by_key(|&i| pooled[i]);
        let mut outputs = Vec::with_capacity(tokens.len().div_ceil(batch_size));
        for chunk in order.chunks(batch_size) {
            let length = chunk.iter().map(|&i| pooled[i] + 1).max().expect("chunks are not empty");
            let sequences: Vec<&[u32]> = chunk.iter().map(|&i| &tokens[i][..pooled[i] + 1]).collect();
            let positions: Vec<usize> = chunk.iter().map(|&i| pooled[i]).collect();
            outputs.push(self.forward_padded(&sequences, length, &positions));
        }
        let sorted = Tensor::cat(outputs, 0);

        // Row r of `sorted` is sequence order[r]; put every sequence back at its own index.
        let mut rank = vec![0i64; tokens.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r as i64;
        }
        Ok(sorted.select(0, self.index_tensor(rank)))
    }

    /// Returns the embeddings computed the way open_clip does: every sequence zero-padded to
    /// the full context length and pooled at its largest id. It costs the full context for
    /// every sequence, so it serves as the reference for [`embed`](Self::embed).
    pub fn embed_full(&self, tokens: &[Vec<u32>]) -> Result<Tensor<2>> {
        let pooled: Vec<usize> =
            tokens.iter().enumerate().map(|(i, seq)| self.pooling_position(i, seq)).collect::<Result<_>>()?;
        if tokens.is_empty() {
            return Ok(Tensor::zeros([0, self.embed_dim()], &self.device()));
        }
        let context = self.config.context_length;
        let mut outputs = Vec::new();
        for (chunk, positions) in tokens.chunks(DEFAULT_BATCH_SIZE).zip(pooled.chunks(DEFAULT_BATCH_SIZE)) {
            let sequences: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            outputs.push(self.forward_padded(&sequences, context, positions));
        }
        Ok(Tensor::cat(outputs, 0))
    }

    /// [`embed_full`](Self::embed_full) for CLIP's usual context of 77 tokens; the name states
    /// which computation open_clip's `encode_text` performs.
    pub fn embed_full77(&self, tokens: &[Vec<u32>]) -> Result<Tensor<2>> {
        self.embed_full(tokens)
    }

    /// Tokenizes texts, embeds them and scales every row to unit length: `[B, d]`.
    pub fn embed_texts_normalized<S: AsRef<str>>(
        &self,
        tokenizer: &ClipTokenizer,
        texts: &[S],
    ) -> Result<Tensor<2>> {
        if tokenizer.context_length() > self.config.context_length {
            return Err(EngineError::Input(format!(
                "the tokenizer produces up to {} tokens but the text tower has a context of {}; \
                 set the tokenizer's context length to the model's",
                tokenizer.context_length(),
                self.config.context_length
            )));
        }
        let tokens = tokenizer.encode_batch(texts)?;
        Ok(normalize_rows(self.embed(&tokens)?))
    }

    /// Returns the position where sequence `index` is pooled (its first largest id), after
    /// checking its ids against the vocabulary and the context.
    fn pooling_position(&self, index: usize, sequence: &[u32]) -> Result<usize> {
        let vocab = self.config.vocab_size;
        if let Some(bad) = sequence.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::Input(format!(
                "token sequence {index} has id {bad}, outside the vocabulary of {vocab} ids"
            )));
        }
        // max_by_key keeps the last maximum, so search from the end to get the first.
        let Some((position, _)) = sequence.iter().enumerate().rev().max_by_key(|&(_, id)| id) else {
            return Err(EngineError::Input(format!("token sequence {index} is empty")));
        };
        let context = self.config.context_length;
        if position >= context {
            return Err(EngineError::Input(format!(
                "token sequence {index} is {} tokens long with its end token at position \
                 {position}, beyond the context of {context} tokens",
                sequence.len()
            )));
        }
        if sequence.len() > context && sequence[context..].iter().any(|&id| id != 0) {
            return Err(EngineError::Input(format!(
                "token sequence {index} has {} tokens, more than the context of {context}",
                sequence.len()
            )));
        }
        Ok(position)
    }

    fn index_tensor(&self, indices: Vec<i64>) -> Tensor<1, Int> {
        let len = indices.len();
        Tensor::from_data(TensorData::new(indices, [len]), &self.device())
    }

    /// Runs B sequences, each zero-padded (or cut) to `length`, and returns the projected output
    /// at `positions[b]` of each: `[B, d]`.
    fn forward_padded(&self, sequences: &[&[u32]], length: usize, positions: &[usize]) -> Tensor<2> {
        let batch = sequences.len();
        let width = self.config.width;
        let mut ids = vec![0i64; batch * length];
        for (b, sequence) in sequences.iter().enumerate() {
            for (t, &id) in sequence.iter().take(length).enumerate() {
                ids[b * length + t] = id as i64;
            }
        }
        let x = self
            .token_embedding
            .clone()
            .select(0, self.index_tensor(ids))
            .reshape([batch, length, width]);
        let mut x = x + self.positional_embedding.clone().narrow(0, 0, length).unsqueeze::<3>();

        let mask = self.causal_mask(length);
        for block in &self.blocks {
            x = self.forward_block(block, x, mask.clone());
        }

        let rows: Vec<i64> = positions.iter().enumerate().map(|(b, &p)| (b * length + p) as i64).collect();
        let pooled = x.reshape([batch * length, width]).select(0, self.index_tensor(rows));
        self.ln_final.forward(pooled).matmul(self.projection.clone())
    }

    /// `[1, 1, T, T]` scores to add: zero where the key position is at or before the query
    /// position, [`MASKED_SCORE`] after it.
    fn causal_mask(&self, length: usize) -> Tensor<4> {
        let mut values = vec![0.0f32; length * length];
        for query in 0..length {
            for key in query + 1..length {
                values[query * length + key] = MASKED_SCORE;
            }
        }
        Tensor::from_data(TensorData::new(values, [1, 1, length, length]), &self.device())
    }

    /// One pre-LayerNorm residual block with causal multi-head self-attention.
    fn forward_block(&self, block: &ResidualBlock, x: Tensor<3>, mask: Tensor<4>) -> Tensor<3> {
        let [batch, tokens, width] = x.dims();
        let heads = self.config.heads;
        let head_dim = width / heads;

        let qkv = block.ln1.forward(x.clone()).matmul(block.qkv_weight.clone().unsqueeze::<3>())
            + block.qkv_bias.clone().unsqueeze::<3>();
        let split = |part: usize| {
            qkv.clone()
                .narrow(2, part * width, width)
                .reshape([batch, tokens, heads, head_dim])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (head_dim as f64).sqrt()) + mask;
        let attended = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([batch, tokens, width]);
        let attn_out = attended.matmul(block.out_weight.clone().unsqueeze::<3>())
            + block.out_bias.clone().unsqueeze::<3>();
        let x = x + attn_out;

        let hidden = block.ln2.forward(x.clone()).matmul(block.mlp_in_weight.clone().unsqueeze::<3>())
            + block.mlp_in_bias.clone().unsqueeze::<3>();
        let post = apply_activation(self.activation, hidden);
        let mlp_out = post.matmul(block.mlp_out_weight.clone().unsqueeze::<3>())
            + block.mlp_out_bias.clone().unsqueeze::<3>();
        x + mlp_out
    }
}

/// Scales every row to unit Euclidean length (rows of norm below 1e-12 are divided by 1e-12, as
/// PyTorch's `F.normalize` does).
pub fn normalize_rows(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

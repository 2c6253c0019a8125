//! The second-order lens: each MLP neuron's contribution to the image embedding through the value
//! paths of the later attention heads (Gandelsman, Efros, Steinhardt, "Interpreting the
//! Second-Order Effects of Neurons in CLIP", ICLR 2025, arXiv 2406.04341).
//!
//! For source block l, later blocks l' > l and their heads h (K = (L - 1 - l) H pairs), the
//! effect of neuron n on one image is
//!
//! ```text
//! phi_n = 100 / (|r| sd_p) * sum_k c[k, n] U[k, n] + s
//! c[k, n] = sum_t A[l', h, 0, t] a[t, n] / sd1[l', t]          (per image)
//! U[k, n] = M[k] B[k][:, n],  M[k] = P^T diag(g_p) W_O[h],  B[k] = W_V[h] diag(g1[l']) W_out_l
//! ```
//!
//! where `s` collects the LayerNorm mean and bias shares that the method divides equally among
//! contributors (Z1 = (1 + 2 l') N per LN1, Z2 = (1 + 2 l')(1 + 2 L) H N per LN_post). `M` and
//! `B` depend only on the weights and are built once per model ([`Lens::new`]); an image costs
//! one `[K, T] x [T, N]` product per block for `c`. Norms use the per-neuron Gram matrices
//! `G_n = U_n U_n^T`, so the `[N, d]` effects are only formed when a caller asks for them.

use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{EngineError, Result};
use crate::model::{Recording, VisionTransformer};

/// Scale of the effects: `phi` lives in the space of `100 r / |r|`, so a dot product with a unit
/// text embedding is a CLIP logit.
pub const LOGIT_SCALE: f64 = 100.0;

/// Neurons per chunk are chosen so that one chunk of `U` has at most this many floats.
const CHUNK_FLOATS: usize = 1 << 24;

/// Returns the source blocks analysed by default: the last three blocks that have a later block
/// (8, 9 and 10 of a 12-block model), or all of them for shallower models.
pub fn default_layers(num_layers: usize) -> Vec<usize> {
    let last = num_layers.saturating_sub(1);
    (last.saturating_sub(3)..last).collect()
}

/// The image-independent part of the lens for one source block.
#[derive(Clone, Debug)]
pub struct BlockBasis {
    pub layer: usize,
    /// Number of (later block, head) pairs K.
    pub pairs: usize,
    /// `M`, `[K, d, e]`.
    m: Tensor<3>,
    /// `B`, `[K, e, N]`.
    b: Tensor<3>,
    /// `G_n = U_n U_n^T`, `[N, K, K]`.
    gram: Tensor<3>,
    /// `M[k] W_V[h] (g1 * b_out) / N`, `[K, d]`, scaled per image by `sum_t A / sd1`.
    share_bias: Tensor<2>,
    /// `M[k] W_V[h] g1 / Z1`, `[K, d]`, scaled per image by `sum_t A mu1 / sd1`.
    share_mean: Tensor<2>,
    /// Image-independent share terms before LN_post's scale: LN1's shift, the value and output
    /// biases, `[d]`.
    share_constant: Tensor<1>,
    /// `sum over (l', h) of 1 / Z2`: how many LN_post mean and shift shares the block's paths carry.
    post_shares: f64,
}

/// The lens basis for a set of source blocks of one model.
#[derive(Clone, Debug)]
pub struct Lens {
    blocks: Vec<BlockBasis>,
    /// `P^T be_p` and `P^T g_p`, `[d]`.
    post_shift: Tensor<1>,
    post_gain: Tensor<1>,
    heads: usize,
    neurons: usize,
    embed_dim: usize,
}

/// Per-image coefficients of one source block for a batch: everything needed to form norms,
/// projections or the full effects.
#[derive(Clone, Debug)]
pub struct BlockCoefficients {
    pub layer: usize,
    /// `c`, `[B, K, N]`.
    pub c: Tensor<3>,
    /// `100 / (|r| sd_p)` per image, `[B, 1]`.
    pub scale: Tensor<2>,
    /// `s` per image, `[B, d]`.
    pub shared: Tensor<2>,
}

impl Lens {
    /// Builds the basis for the given source blocks. Each must have a later block.
    pub fn new(model: &VisionTransformer, layers: &[usize]) -> Result<Self> {
        let config = &model.config;
        let total = config.layers;
        for &layer in layers {
            if layer + 1 >= total {
                return Err(EngineError::Input(format!(
                    "block {layer} has no later block in a {total}-block model; \
                     the lens needs a source block below {}",
                    total - 1
                )));
            }
        }
        let gain = model.ln_post.weight.clone();
        let projection = model.projection.clone();
        let [width, embed_dim] = projection.dims();
        // P scaled by g_p on its rows: diag(g_p) P, [D, d].
        let gained_projection = projection.clone() * gain.clone().reshape([width, 1]);
        let post_shift = model.ln_post.bias.clone().reshape([1, width]).matmul(projection.clone());
        let post_gain = gain.reshape([1, width]).matmul(projection);

        let blocks = layers
            .iter()
            .map(|&layer| build_block(model, layer, &gained_projection))
            .collect::<Result<Vec<_>>>()?;
        Ok(Lens {
            blocks,
            post_shift: post_shift.reshape([embed_dim]),
            post_gain: post_gain.reshape([embed_dim]),
            heads: config.heads,
            neurons: config.mlp_dim,
            embed_dim,
        })
    }

    pub fn layers(&self) -> Vec<usize> {
        self.blocks.iter().map(|b| b.layer).collect()
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    fn block(&self, layer: usize) -> Result<&BlockBasis> {
        self.blocks.iter().find(|b| b.layer == layer).ok_or_else(|| {
            EngineError::Input(format!(
                "block {layer} is not in this lens (built for blocks {:?})",
                self.layers()
            ))
        })
    }

    /// Computes the per-image coefficients of source block `layer` from a forward pass's
    /// embedding `[B, d]` and recording (which must hold the lens quantities and the block's
    /// MLP post-activations).
    pub fn coefficients(
        &self,
        embedding: &Tensor<2>,
        recording: &Recording,
        layer: usize,
    ) -> Result<BlockCoefficients> {
        let basis = self.block(layer)?;
        let missing = |what: &str| {
            EngineError::Input(format!("the forward pass did not record {what} needed by the lens"))
        };
        let post = recording
            .mlp_post
            .get(&layer)
            .ok_or_else(|| missing(&format!("blocks.{layer}.mlp.hook_post")))?;
        let total = recording.ln1_scale.len();
        if total <= layer || recording.attn_class.len() != total || recording.ln1_mean.len() != total {
            return Err(missing("LN1 statistics and attention patterns"));
        }
        let post_mean = recording.ln_post_mean.clone().ok_or_else(|| missing("LN_post statistics"))?;
        let post_scale =
            recording.ln_post_scale.clone().ok_or_else(|| missing("LN_post statistics"))?;
        let [batch, _] = embedding.dims();

        // W[b, k, t] = A[l', b, h, t] / sd1[l', b, t], and the same times mu1 for the mean shares.
        let mut weights = Vec::new();
        let mut weighted_means = Vec::new();
        for later in layer + 1..total {
            let [_, heads, tokens] = recording.attn_class[later].dims();
            let w = recording.attn_class[later].clone()
                / recording.ln1_scale[later].clone().reshape([batch, 1, tokens]);
            let mean = recording.ln1_mean[later].clone().reshape([batch, 1, tokens]);
            weighted_means.push((w.clone() * mean).sum_dim(2).reshape([batch, heads]));
            weights.push(w);
        }
        let weights = Tensor::cat(weights, 1);
        let alpha = weights.clone().sum_dim(2).reshape([batch, basis.pairs]);
        let beta = Tensor::cat(weighted_means, 1);
        let c = weights.matmul(post.clone());

        let norm = embedding.clone().powi_scalar(2).sum_dim(1).sqrt();
        let post_scale = post_scale.reshape([batch, 1]);
        let post_mean = post_mean.reshape([batch, 1]);
        let outer = norm.recip().mul_scalar(LOGIT_SCALE);
        let scale = outer.clone() / post_scale.clone();

        let d = self.embed_dim;
        let before_post = alpha.matmul(basis.share_bias.clone())
            - beta.matmul(basis.share_mean.clone())
            + basis.share_constant.clone().reshape([1, d]);
        let post_terms = (self.post_shift.clone().reshape([1, d])
            - (post_mean / post_scale.clone()) * self.post_gain.clone().reshape([1, d]))
        .mul_scalar(basis.post_shares);
        let shared = (before_post / post_scale + post_terms) * outer;

        Ok(BlockCoefficients { layer, c, scale, shared })
    }

    /// Norms `|phi_n|` of every neuron's effect, `[B, N]`, without forming the effects.
    pub fn effect_norms(&self, coefficients: &BlockCoefficients) -> Result<Tensor<2>> {
        let basis = self.block(coefficients.layer)?;
        let [batch, pairs, neurons] = coefficients.c.dims();
        let c = coefficients.c.clone();

        // Quadratic term c_n^T G_n c_n, batched over neurons: [N, B, K] x [N, K, K].
        let per_neuron = c.clone().permute([2, 0, 1]);
        let quadratic = (per_neuron.clone().matmul(basis.gram.clone()) * per_neuron)
            .sum_dim(2)
            .reshape([neurons, batch])
            .transpose();

        // Cross term c_n . (U_n s): U_n s = B[k]^T (M[k]^T s) for every k at once.
        let shared = coefficients.shared.clone();
        let projected = shared.clone().unsqueeze::<3>().matmul(basis.m.clone()); // [K, B, e]
        let along = projected.matmul(basis.b.clone()).swap_dims(0, 1); // [B, K, N]
        let cross = (c * along).sum_dim(1).reshape([batch, neurons]);

        let scale = coefficients.scale.clone();
        let shared_sq = shared.powi_scalar(2).sum_dim(1);
        let squared = quadratic * scale.clone().powi_scalar(2)
            + cross * scale.mul_scalar(2.0)
            + shared_sq;
        debug_assert_eq!(pairs, basis.pairs);
        Ok(squared.clamp_min(0.0).sqrt())
    }

    /// Computes the full effects `phi`, `[B, N, d]`. Costs `K N d` multiply-adds per image plus forming
    /// `U` chunk by chunk; prefer [`Lens::effect_norms`] or projections where they suffice.
    pub fn effects(&self, coefficients: &BlockCoefficients) -> Result<Tensor<3>> {
        let basis = self.block(coefficients.layer)?;
        let [batch, pairs, neurons] = coefficients.c.dims();
        let d = self.embed_dim;
        let chunk = (CHUNK_FLOATS / (pairs * d)).max(1);
        let mut parts = Vec::new();
        let mut start = 0;
        while start < neurons {
            let len = chunk.min(neurons - start);
            let u = basis.m.clone().matmul(basis.b.clone().narrow(2, start, len)); // [K, d, n]
            let u = u.permute([2, 0, 1]); // [n, K, d]
            let c = coefficients.c.clone().narrow(2, start, len).permute([2, 0, 1]); // [n, B, K]
            parts.push(c.matmul(u).swap_dims(0, 1)); // [B, n, d]
            start += len;
        }
        let summed = Tensor::cat(parts, 1);
        Ok(summed * coefficients.scale.clone().reshape([batch, 1, 1])
            + coefficients.shared.clone().reshape([batch, 1, d]))
    }

    pub fn neurons(&self) -> usize {
        self.neurons
    }

    /// Returns the device the basis is stored on.
    pub fn device(&self) -> Device {
        self.post_gain.device()
    }

    /// Width d of the joint embedding, the length of every effect.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// Number of (later block, head) pairs K of source block `layer`: the rows of its `c`.
    pub fn pairs(&self, layer: usize) -> Result<usize> {
        Ok(self.block(layer)?.pairs)
    }

    /// Forms the vectors `U[k, n]` of neurons `start..start + len` of block `layer`,
    /// `[len, K, d]`. Neuron n's effect is `scale * c[:, n]^T U_n + shared`. Costs `K d e`
    /// multiply-adds per neuron.
    pub fn neuron_basis(&self, layer: usize, start: usize, len: usize) -> Result<Tensor<3>> {
        let basis = self.block(layer)?;
        if start + len > self.neurons {
            return Err(EngineError::Input(format!(
                "neurons {start}..{} requested from a block of {} neurons",
                start + len,
                self.neurons
            )));
        }
        let u = basis.m.clone().matmul(basis.b.clone().narrow(2, start, len)); // [K, d, len]
        Ok(u.permute([2, 0, 1]))
    }

    /// Computes the norms of the centered effects `|phi_n - b_n|`, `[B, N]`. The mean effect
    /// `b_n` is given by the mean of the scaled coefficients `scale * c` (`[K, N]`) and the mean of
    /// `shared` (`[d]`) over an image set. `phi` is linear in both, so this is the norm of the
    /// effect with coefficients `scale * c - mean_coefficients`, scale 1 and shared vector
    /// `shared - mean_shared`.
    pub fn centered_norms(
        &self,
        coefficients: &BlockCoefficients,
        mean_coefficients: &Tensor<2>,
        mean_shared: &Tensor<1>,
    ) -> Result<Tensor<2>> {
        let [batch, pairs, neurons] = coefficients.c.dims();
        if mean_coefficients.dims() != [pairs, neurons] || mean_shared.dims() != [self.embed_dim] {
            return Err(EngineError::Input(format!(
                "block {}: means of shape {:?} and {:?} do not match coefficients [{pairs}, \
                 {neurons}] and a shared vector of length {}",
                coefficients.layer,
                mean_coefficients.dims(),
                mean_shared.dims(),
                self.embed_dim
            )));
        }
        let scaled = coefficients.c.clone() * coefficients.scale.clone().reshape([batch, 1, 1]);
        let centered = BlockCoefficients {
            layer: coefficients.layer,
            c: scaled - mean_coefficients.clone().unsqueeze::<3>(),
            scale: Tensor::ones([batch, 1], &coefficients.c.device()),
            shared: coefficients.shared.clone() - mean_shared.clone().unsqueeze::<2>(),
        };
        self.effect_norms(&centered)
    }
}

fn build_block(model: &VisionTransformer, layer: usize, gained_projection: &Tensor<2>) -> Result<BlockBasis> {
    let config = &model.config;
    let (width, heads, total) = (config.width, config.heads, config.layers);
    let head_dim = width / heads;
    let neurons = config.mlp_dim;
    let embed_dim = gained_projection.dims()[1];
    let source = &model.blocks[layer];
    let mlp_out_bias = source.mlp_out_bias.clone().reshape([1, width]);

    let mut m_parts = Vec::new();
    let mut b_parts = Vec::new();
    let mut share_bias = Vec::new();
    let mut share_mean = Vec::new();
    let mut share_constant = Tensor::<1>::zeros([embed_dim], &model.device());
    let mut post_shares = 0.0;
    for later in layer + 1..total {
        let block = &model.blocks[later];
        let z1 = ((1 + 2 * later) * neurons) as f64;
        let z2 = ((1 + 2 * later) * (1 + 2 * total) * heads * neurons) as f64;
        let g1 = block.ln1.weight.clone().reshape([1, width]);
        let value_weight = block.qkv_weight.clone().narrow(1, 2 * width, width); // [D_in, D_out]
        let value_bias = block.qkv_bias.clone().narrow(0, 2 * width, width).reshape([1, width]);

        // M[h] = P^T diag(g_p) W_O[h]: rows h of the stored [D_in, D_out] output weight.
        let m = block
            .out_weight
            .clone()
            .matmul(gained_projection.clone())
            .reshape([heads, head_dim, embed_dim])
            .swap_dims(1, 2); // [H, d, e]

        // B[h] = W_V[h] diag(g1) W_out_l, from the stored [N, D] MLP output and [D, D] value weights.
        let b = (source.mlp_out_weight.clone() * g1.clone())
            .matmul(value_weight.clone())
            .transpose()
            .reshape([heads, head_dim, neurons]);

        // Value-space share vectors [H, e] for the bias of the source MLP, LN1's mean, LN1's shift
        // plus the value bias; each is mapped through M[h] into the embedding space.
        let through_m = |v: Tensor<2>| m.clone().matmul(v.reshape([heads, head_dim, 1])).reshape([heads, embed_dim]);
        let bias_share = (mlp_out_bias.clone() * g1.clone()).matmul(value_weight.clone()).div_scalar(neurons as f64);
        let mean_share = g1.clone().matmul(value_weight.clone()).div_scalar(z1);
        let shift_share = (block.ln1.bias.clone().reshape([1, width]).matmul(value_weight) + value_bias)
            .div_scalar(z1);
        share_bias.push(through_m(bias_share));
        share_mean.push(through_m(mean_share));
        let shift = through_m(shift_share).sum_dim(0).reshape([embed_dim]);
        // Each head carries b_O / (Z1 H); the H heads together carry b_O / Z1.
        let out_bias = block
            .out_bias
            .clone()
            .reshape([1, width])
            .matmul(gained_projection.clone())
            .reshape([embed_dim])
            .div_scalar(z1);
        share_constant = share_constant + shift + out_bias;
        post_shares += heads as f64 / z2;

        m_parts.push(m);
        b_parts.push(b);
    }
    let m = Tensor::cat(m_parts, 0);
    let b = Tensor::cat(b_parts, 0);
    let pairs = (total - 1 - layer) * heads;
    let gram = gram_matrices(&m, &b, pairs, embed_dim, neurons);
    Ok(BlockBasis {
        layer,
        pairs,
        m,
        b,
        gram,
        share_bias: Tensor::cat(share_bias, 0),
        share_mean: Tensor::cat(share_mean, 0),
        share_constant,
        post_shares,
    })
}

/// `G_n = U_n U_n^T` for every neuron, `[N, K, K]`, forming `U` in chunks of neurons.
fn gram_matrices(m: &Tensor<3>, b: &Tensor<3>, pairs: usize, embed_dim: usize, neurons: usize) -> Tensor<3> {
    let chunk = (CHUNK_FLOATS / (pairs * embed_dim)).max(1);
    let mut parts = Vec::new();
    let mut start = 0;
    while start < neurons {
        let len = chunk.min(neurons - start);
        let u = m.clone().matmul(b.clone().narrow(2, start, len)).permute([2, 0, 1]); // [n, K, d]
        parts.push(u.clone().matmul(u.swap_dims(1, 2)));
        start += len;
    }
    Tensor::cat(parts, 0)
}

/// A literal implementation of the definition, step by step per image, later block, head,
/// neuron and token, in f64 on the host. It is the test oracle for the factorized [`Lens`]; it
/// costs `B K N T D e` multiply-adds, so use it only on small models.
pub mod literal {
    use super::*;

    fn host(t: &Tensor<1>) -> Vec<f64> {
        values(t.clone().into_data())
    }

    fn host2(t: &Tensor<2>) -> (Vec<f64>, [usize; 2]) {
        (values(t.clone().into_data()), t.dims())
    }

    fn values(data: TensorData) -> Vec<f64> {
        data.convert::<f32>().try_to_vec::<f32>().expect("f32 data").into_iter().map(f64::from).collect()
    }

    /// Effects `[B][N][d]` of source block `layer`, following steps 1-6 of the definition.
    pub fn effects(
        model: &VisionTransformer,
        embedding: &Tensor<2>,
        recording: &Recording,
        layer: usize,
    ) -> Vec<Vec<Vec<f64>>> {
        let config = &model.config;
        let (width, heads, total, neurons) = (config.width, config.heads, config.layers, config.mlp_dim);
        let head_dim = width / heads;
        let tokens = config.tokens();
        let (embedding, [batch, embed_dim]) = host2(embedding);
        let (projection, _) = host2(&model.projection); // [D, d]
        let gain_post = host(&model.ln_post.weight);
        let shift_post = host(&model.ln_post.bias);
        let post_mean = values(recording.ln_post_mean.clone().expect("lens recording").into_data());
        let post_scale = values(recording.ln_post_scale.clone().expect("lens recording").into_data());
        let activations = values(recording.mlp_post[&layer].clone().into_data()); // [B, T, N]
        let (mlp_out, _) = host2(&model.blocks[layer].mlp_out_weight); // [N, D]
        let mlp_out_bias = host(&model.blocks[layer].mlp_out_bias);

        let mut result = vec![vec![vec![0.0f64; embed_dim]; neurons]; batch];
        for later in layer + 1..total {
            let block = &model.blocks[later];
            let z1 = ((1 + 2 * later) * neurons) as f64;
            let z2 = ((1 + 2 * later) * (1 + 2 * total) * heads * neurons) as f64;
            let g1 = host(&block.ln1.weight);
            let be1 = host(&block.ln1.bias);
            let (qkv, _) = host2(&block.qkv_weight); // [D_in, 3D]
            let qkv_bias = host(&block.qkv_bias);
            let (out_weight, _) = host2(&block.out_weight); // [D_in, D_out]
            let out_bias = host(&block.out_bias);
            let mu1 = values(recording.ln1_mean[later].clone().into_data()); // [B, T]
            let sd1 = values(recording.ln1_scale[later].clone().into_data());
            let pattern = values(recording.attn_class[later].clone().into_data()); // [B, H, T]

            for b in 0..batch {
                let norm = (0..embed_dim).map(|j| embedding[b * embed_dim + j].powi(2)).sum::<f64>().sqrt();
                for h in 0..heads {
                    for n in 0..neurons {
                        let mut o = vec![0.0f64; head_dim];
                        for t in 0..tokens {
                            let mean = mu1[b * tokens + t];
                            let sd = sd1[b * tokens + t];
                            let a = activations[(b * tokens + t) * neurons + n];
                            // Step 1: x_t = a w_n + b_out / N. Step 2: through LN1 with shares.
                            let u: Vec<f64> = (0..width)
                                .map(|i| {
                                    let x = a * mlp_out[n * width + i] + mlp_out_bias[i] / neurons as f64;
                                    g1[i] * (x - mean / z1) / sd + be1[i] / z1
                                })
                                .collect();
                            // Step 3: value of head h, v_t = W_V[h] u_t + b_V[h] / Z1.
                            let weight = pattern[(b * heads + h) * tokens + t];
                            for j in 0..head_dim {
                                let column = 2 * width + h * head_dim + j;
                                let mut v = qkv_bias[column] / z1;
                                for i in 0..width {
                                    v += qkv[i * 3 * width + column] * u[i];
                                }
                                // Step 4: attention-weighted sum into the class token.
                                o[j] += weight * v;
                            }
                        }
                        // Step 4: y = W_O[h] o + b_O / (Z1 H).
                        let y: Vec<f64> = (0..width)
                            .map(|i| {
                                let mut y = out_bias[i] / (z1 * heads as f64);
                                for j in 0..head_dim {
                                    y += out_weight[(h * head_dim + j) * width + i] * o[j];
                                }
                                y
                            })
                            .collect();
                        // Step 5: through LN_post with shares, then P^T. Step 6: scale by 100 / |r|.
                        let z: Vec<f64> = (0..width)
                            .map(|i| {
                                gain_post[i] * (y[i] - post_mean[b] / z2) / post_scale[b] + shift_post[i] / z2
                            })
                            .collect();
                        let effect = &mut result[b][n];
                        for (k, e) in effect.iter_mut().enumerate() {
                            let mut dot = 0.0;
                            for i in 0..width {
                                dot += projection[i * embed_dim + k] * z[i];
                            }
                            *e += LOGIT_SCALE / norm * dot;
                        }
                    }
                }
            }
        }
        result
    }
}

"""Write the reference-model fixtures under fixtures/models/.

Run from the repository root:

    /opt/refenv/bin/python tools/fixtures_models.py

Environment: Python 3.11 with the packages pinned in tools/requirements.txt, which also shows how
to create /opt/refenv. No network access is needed: every model is built from a config and
filled with seeded random weights, and every input is seeded, so a rerun rewrites the same files.

For each model with weights the script writes a model directory as the reference library stores
it (safetensors weights plus a config.json) and an `expected/` directory with float32 .npy files:
the image embedding from the library's own forward pass, the quantities the second-order lens
records (named after TransformerLens hook points), and the second-order effects of blocks 1 and 2
computed by a literal float64 implementation of the lens definition. fixtures/models/README.md
lists the files and their shapes.

The recordings come from forward hooks on the library's modules during its own forward pass, plus
one hook-free call of each block's attention module to obtain per-head attention weights. The LN
statistics are computed from the hooked LN inputs and checked against the LN outputs. Before
writing, the script checks that the recorded statistics, attention weights and weight slices
rebuild each block's attention output and the embedding, and that the literal effects equal the
factorized form.
"""

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import safetensors.torch
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "models"

BATCH = 3
# Source blocks whose second-order effects are written (0-based).
EFFECT_LAYERS = (1, 2)
# The tiny text towers use ids below 1000; CLIP's start and end tokens are the two highest ids.
VOCAB_SIZE = 1000
START_TOKEN = VOCAB_SIZE - 2
END_TOKEN = VOCAB_SIZE - 1

SEED_OPENCLIP_QUICKGELU = 1001
SEED_OPENCLIP_GELU = 1002
SEED_HF = 1003
SEED_INPUTS = 2001
# The lens divides biases, LN shifts and LN means among up to (1 + 2 l')(1 + 2 L) H N
# contributors. With biases of std 0.02, dropping the LN_post shift share changed the block-2
# effects by only 5e-5 of their max, which is below the 1e-4 test tolerance. With std 0.5,
# dropping any single share term changes them by at least 8e-4.
BIAS_STD = 0.5

# The CLIP preprocessing constants (OpenAI's dataset mean and std) for the preprocess_cfg section.
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def open_clip_model_config(quick_gelu: bool) -> dict:
    """Return the tiny open_clip model config. The `quick_gelu` key is left out when false, as
    open_clip's own configs for GELU models (ViT-B-32.json) leave it out."""
    config = {
        "embed_dim": 24,
        "vision_cfg": {
            "image_size": 32,
            "layers": 4,
            "width": 32,
            "head_width": 8,
            "mlp_ratio": 4.0,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": VOCAB_SIZE,
            "width": 32,
            "heads": 4,
            "layers": 2,
        },
    }
    if quick_gelu:
        config = {"embed_dim": config["embed_dim"], "quick_gelu": True, **config}
    return config


def hf_clip_config() -> transformers.CLIPConfig:
    # pad, bos and eos ids as in openai/clip-vit-base-patch32's text_config; eos_token_id 2 makes
    # Hugging Face pool at the argmax token id, as open_clip does.
    text_config = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
    vision_config = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "hidden_act": "quick_gelu",
    }
    return transformers.CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=24
    )


# ---------------------------------------------------------------------------------------------
# Seeded weights


def draw_parameter(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Draw a value for one parameter from its name.

    LayerNorm gains are 1 +- 0.1. Weight matrices get std 1/sqrt(fan_in) instead of CLIP's
    small init: that keeps pre-activations of order 1, so the attention patterns are far from
    uniform and QuickGELU differs visibly from GELU. Class, positional and token embeddings get
    std 0.1; the output projections get std 1/sqrt(width).
    """
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(key in name for key in ("ln_", "layer_norm", "layrnorm", "layernorm"))
    if name == "logit_scale":
        return np.asarray(math.log(1 / 0.07) + 0.1 * rng.standard_normal(), dtype=np.float64)
    if is_norm and leaf == "weight":
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if leaf.endswith("bias"):
        return BIAS_STD * rng.standard_normal(shape)
    if any(key in name for key in ("class_embedding", "positional_embedding", "position_embedding",
                                   "token_embedding")):
        return 0.1 * rng.standard_normal(shape)
    if name in ("visual.proj", "text_projection"):
        # open_clip stores these as [width, embed_dim] and computes x @ proj.
        return rng.standard_normal(shape) / math.sqrt(shape[0])
    if name in ("visual_projection.weight", "text_projection.weight"):
        # Hugging Face stores these as nn.Linear weights, [embed_dim, width].
        return rng.standard_normal(shape) / math.sqrt(shape[1])
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return rng.standard_normal(shape) / math.sqrt(fan_in)
    raise ValueError(f"no rule to draw parameter '{name}' of shape {shape}")


def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter of `model`, in name order, with seeded random values."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            value = draw_parameter(name, tuple(param.shape), rng)
            param.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)).reshape(param.shape))


def round_state_dict(state: dict, dtype: torch.dtype) -> dict:
    return {name: tensor.to(dtype).contiguous() for name, tensor in state.items()}


def save_safetensors(state: dict, path: Path) -> None:
    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Recording


def layer_norm_statistics(x: torch.Tensor, eps: float) -> tuple:
    """Return the mean and sqrt(biased variance + eps) over the last axis, in float64."""
    x = x.double()
    mean = x.mean(dim=-1)
    scale = torch.sqrt(x.var(dim=-1, unbiased=False) + eps)
    return mean, scale


def check_layer_norm_statistics(x, y, mean, scale, weight, bias, label: str) -> None:
    """Check that `y = LN(x)` is rebuilt from the recorded mean and scale."""
    with torch.no_grad():
        rebuilt = (x.double() - mean[..., None]) / scale[..., None] * weight.double() + bias.double()
    assert_close(rebuilt, y.double(), 1e-5, label)


def assert_close(actual, expected, tolerance: float, label: str) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}: shape {actual.shape} != {expected.shape}")
    scale = max(np.abs(expected).max(), 1e-30)
    error = np.abs(actual - expected).max() / scale
    if not error <= tolerance:
        raise AssertionError(f"{label}: max error {error:.3e} relative to max |expected| "
                             f"exceeds {tolerance:.0e}")


class Hooks:
    """Forward hooks that store a module's input or output under a key; removed on exit."""

    def __init__(self):
        self.values = {}
        self.handles = []

    def capture_input(self, module: torch.nn.Module, key: str) -> None:
        def hook(_module, args):
            self.values[key] = args[0].detach().clone()
        self.handles.append(module.register_forward_pre_hook(hook))

    def capture_output(self, module: torch.nn.Module, key: str) -> None:
        def hook(_module, _args, output):
            self.values[key] = output
        self.handles.append(module.register_forward_hook(hook))

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        for handle in self.handles:
            handle.remove()


def record_open_clip(model: open_clip.model.CLIP, pixels: torch.Tensor) -> dict:
    """Run `model.encode_image` with hooks and return the embedding and the lens recording.

    open_clip 3.3.0 runs its transformer batch-first ([B, T, D]). When `transformer.batch_first`
    is False or absent, the tensors captured inside the transformer are [T, B, D], so they are
    transposed to [B, T, ...] here.
    """
    visual = model.visual
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", False)

    def to_batch_first(x: torch.Tensor) -> torch.Tensor:
        return x if batch_first else x.transpose(0, 1)

    with Hooks() as hooks:
        for index, block in enumerate(blocks):
            hooks.capture_input(block.ln_1, f"ln1_in.{index}")
            hooks.capture_output(block.ln_1, f"ln1_out.{index}")
            hooks.capture_output(block.attn, f"attn_out.{index}")
            # The input of c_proj is the post-activation value of every neuron.
            hooks.capture_input(block.mlp.c_proj, f"mlp_post.{index}")
        hooks.capture_input(visual.ln_post, "ln_post_in")
        hooks.capture_output(visual.ln_post, "ln_post_out")
        with torch.no_grad():
            embedding = model.encode_image(pixels, normalize=False)
        values = hooks.values

    recording = {"embedding": embedding, "blocks": []}
    for index, block in enumerate(blocks):
        ln1_in = to_batch_first(values[f"ln1_in.{index}"])
        ln1_out = to_batch_first(values[f"ln1_out.{index}"])
        mean, scale = layer_norm_statistics(ln1_in, block.ln_1.eps)
        check_layer_norm_statistics(ln1_in, ln1_out, mean, scale, block.ln_1.weight,
                                    block.ln_1.bias, f"open_clip block {index} LN1")

        # ResidualAttentionBlock calls nn.MultiheadAttention with need_weights=False; this
        # second call on the same LN1 output returns the per-head softmax weights.
        attn_in = values[f"ln1_out.{index}"]
        with torch.no_grad():
            rerun, weights = block.attn(attn_in, attn_in, attn_in, need_weights=True,
                                        average_attn_weights=False)
        attn_out = to_batch_first(values[f"attn_out.{index}"][0])
        assert_close(to_batch_first(rerun), attn_out, 1e-5,
                     f"open_clip block {index} attention re-run")

        recording["blocks"].append({
            "residual_in": ln1_in,
            "ln1_mean": mean,
            "ln1_scale": scale,
            # nn.MultiheadAttention returns weights as [B, H, T_query, T_key] in both layouts.
            "attn_class": weights[:, :, 0, :],
            "attn_out_class": attn_out[:, 0, :],
            "mlp_post": to_batch_first(values[f"mlp_post.{index}"]),
        })

    ln_post_in = values["ln_post_in"][:, 0, :]
    mean, scale = layer_norm_statistics(ln_post_in, visual.ln_post.eps)
    check_layer_norm_statistics(ln_post_in, values["ln_post_out"][:, 0, :], mean, scale,
                                visual.ln_post.weight, visual.ln_post.bias, "open_clip LN_post")
    recording["ln_post_in"] = ln_post_in
    recording["ln_post_mean"] = mean
    recording["ln_post_scale"] = scale
    return recording


def projected_features(output) -> torch.Tensor:
    """Return the projected embedding from `CLIPModel.get_image_features` or
    `get_text_features`, which return a tensor in transformers 4.x and a
    BaseModelOutputWithPooling (embedding in `pooler_output`) in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def record_hugging_face(model: transformers.CLIPModel, pixels: torch.Tensor) -> dict:
    """Run `model.get_image_features` with hooks and return the embedding and the lens recording.

    The model must use the eager attention implementation: it is the one that computes the
    softmax weights that the attention module returns.
    """
    vision = model.vision_model
    layers = vision.encoder.layers
    with Hooks() as hooks:
        for index, layer in enumerate(layers):
            hooks.capture_input(layer.layer_norm1, f"ln1_in.{index}")
            hooks.capture_output(layer.layer_norm1, f"ln1_out.{index}")
            hooks.capture_output(layer.self_attn, f"attn.{index}")
            hooks.capture_input(layer.mlp.fc2, f"mlp_post.{index}")
        hooks.capture_input(vision.post_layernorm, "ln_post_in")
        hooks.capture_output(vision.post_layernorm, "ln_post_out")
        with torch.no_grad():
            embedding = projected_features(model.get_image_features(pixel_values=pixels))
        values = hooks.values

    recording = {"embedding": embedding, "blocks": []}
    for index, layer in enumerate(layers):
        ln1_in = values[f"ln1_in.{index}"]
        mean, scale = layer_norm_statistics(ln1_in, layer.layer_norm1.eps)
        check_layer_norm_statistics(ln1_in, values[f"ln1_out.{index}"], mean, scale,
                                    layer.layer_norm1.weight, layer.layer_norm1.bias,
                                    f"Hugging Face layer {index} LN1")
        attn_out, weights = values[f"attn.{index}"]
        if weights is None:
            raise RuntimeError("the attention module returned no weights; load the model with "
                               "attn_implementation='eager'")
        recording["blocks"].append({
            "residual_in": ln1_in,
            "ln1_mean": mean,
            "ln1_scale": scale,
            "attn_class": weights[:, :, 0, :],
            "attn_out_class": attn_out[:, 0, :],
            "mlp_post": values[f"mlp_post.{index}"],
        })

    # CLIPVisionModel pools the class token before post_layernorm, so its input is [B, D].
    ln_post_in = values["ln_post_in"]
    mean, scale = layer_norm_statistics(ln_post_in, vision.post_layernorm.eps)
    check_layer_norm_statistics(ln_post_in, values["ln_post_out"], mean, scale,
                                vision.post_layernorm.weight, vision.post_layernorm.bias,
                                "Hugging Face LN_post")
    recording["ln_post_in"] = ln_post_in
    recording["ln_post_mean"] = mean
    recording["ln_post_scale"] = scale
    return recording


# ---------------------------------------------------------------------------------------------
# Weights the lens uses, in one naming for both libraries (float64)


def lens_weights_open_clip(model: open_clip.model.CLIP) -> dict:
    visual = model.visual
    width = visual.transformer.width

    def f64(t):
        return t.detach().double().numpy()

    blocks = []
    for block in visual.transformer.resblocks:
        in_proj_weight = f64(block.attn.in_proj_weight)
        in_proj_bias = f64(block.attn.in_proj_bias)
        blocks.append({
            "W_out": f64(block.mlp.c_proj.weight),  # [D, N]
            "b_out": f64(block.mlp.c_proj.bias),
            "g1": f64(block.ln_1.weight),
            "be1": f64(block.ln_1.bias),
            # The fused in_proj stacks the query, key and value projections in that order.
            "W_V": in_proj_weight[2 * width:3 * width],  # [D_value, D_in]
            "b_V": in_proj_bias[2 * width:3 * width],
            "W_O": f64(block.attn.out_proj.weight),  # [D_out, D_value]
            "b_O": f64(block.attn.out_proj.bias),
        })
    return {
        "blocks": blocks,
        "heads": visual.transformer.resblocks[0].attn.num_heads,
        "g_p": f64(visual.ln_post.weight),
        "be_p": f64(visual.ln_post.bias),
        "P": f64(visual.proj),  # [D, d]
    }


def lens_weights_hugging_face(model: transformers.CLIPModel) -> dict:
    vision = model.vision_model

    def f64(t):
        return t.detach().double().numpy()

    blocks = []
    for layer in vision.encoder.layers:
        blocks.append({
            "W_out": f64(layer.mlp.fc2.weight),
            "b_out": f64(layer.mlp.fc2.bias),
            "g1": f64(layer.layer_norm1.weight),
            "be1": f64(layer.layer_norm1.bias),
            "W_V": f64(layer.self_attn.v_proj.weight),
            "b_V": f64(layer.self_attn.v_proj.bias),
            "W_O": f64(layer.self_attn.out_proj.weight),
            "b_O": f64(layer.self_attn.out_proj.bias),
        })
    return {
        "blocks": blocks,
        "heads": vision.config.num_attention_heads,
        "g_p": f64(vision.post_layernorm.weight),
        "be_p": f64(vision.post_layernorm.bias),
        "P": f64(model.visual_projection.weight).T,
    }


# ---------------------------------------------------------------------------------------------
# The second-order lens, literally


def second_order_effects_literal(recorded: dict, weights: dict, layer: int) -> np.ndarray:
    """Compute the second-order effects of every neuron of block `layer`, [B, N, d], in float64.

    This is the definition of Gandelsman, Efros and Steinhardt ("Interpreting the Second-Order
    Effects of Neurons in CLIP", ICLR 2025) with the share counts of their code. It is evaluated
    term by term in a loop over later blocks, heads and tokens, vectorized only over neurons (row
    n of each [N, ...] array belongs to neuron n). It uses nothing but the recorded arrays (as
    written to the .npy files) and the model's weights, so it is an oracle for a factorized
    implementation.

    `recorded` holds float64 arrays: `mlp_post` {l: [B, T, N]}, `ln1_mean` and `ln1_scale`
    [L][B, T], `attn_class` [L][B, H, T], `ln_post_mean` and `ln_post_scale` [B] and
    `embedding` [B, d].
    """
    blocks = weights["blocks"]
    num_blocks = len(blocks)
    num_heads = weights["heads"]
    activations = recorded["mlp_post"][layer]
    batch, tokens, neurons = activations.shape
    width = blocks[layer]["W_out"].shape[0]
    head_dim = width // num_heads
    w = blocks[layer]["W_out"].T  # row n is w_n, the output weights of neuron n
    b_out = blocks[layer]["b_out"]
    g_p, be_p, projection = weights["g_p"], weights["be_p"], weights["P"]

    effects = np.zeros((batch, neurons, projection.shape[1]))
    for b in range(batch):
        mu_p = recorded["ln_post_mean"][b]
        sd_p = recorded["ln_post_scale"][b]
        total = np.zeros((neurons, projection.shape[1]))
        for later in range(layer + 1, num_blocks):
            block = blocks[later]
            z1 = (1 + 2 * later) * neurons
            z2 = (1 + 2 * later) * (1 + 2 * num_blocks) * num_heads * neurons
            for h in range(num_heads):
                rows = slice(h * head_dim, (h + 1) * head_dim)
                w_v, b_v = block["W_V"][rows], block["b_V"][rows]
                w_o = block["W_O"][:, rows]
                o = np.zeros((neurons, head_dim))
                for t in range(tokens):
                    mu1 = recorded["ln1_mean"][later][b, t]
                    sd1 = recorded["ln1_scale"][later][b, t]
                    # Step 1: the neuron's contribution at token t, plus its share of b_out.
                    x_t = activations[b, t, :, None] * w + b_out / neurons
                    # Step 2: LN1 of the later block, linearized with the recorded mean and scale.
                    u_t = block["g1"] * (x_t - mu1 / z1) / sd1 + block["be1"] / z1
                    # Step 3: the value vector of head h.
                    v_t = u_t @ w_v.T + b_v / z1
                    # Step 4, first half: the class-token query's attention-weighted sum.
                    o += recorded["attn_class"][later][b, h, t] * v_t
                # Step 4, second half: the head's output projection with its share of b_O.
                y = o @ w_o.T + block["b_O"] / (z1 * num_heads)
                # Step 5: LN_post, linearized with the class token's statistics, then P.
                z = g_p * (y - mu_p / z2) / sd_p + be_p / z2
                total += z @ projection
        # Step 6: scale into the space of 100 r / |r|.
        effects[b] = 100.0 / np.linalg.norm(recorded["embedding"][b]) * total
    return effects


def second_order_effects_factorized(recorded: dict, weights: dict, layer: int) -> np.ndarray:
    """Compute the same effects by the factorization phi_n = 100/(|r| sd_p) sum c U + s, as a
    check of the literal loop. `s`, the share terms, is the literal effect with zero
    activations, because every other term is linear in the activations."""
    blocks = weights["blocks"]
    num_heads = weights["heads"]
    activations = recorded["mlp_post"][layer]
    batch, _, neurons = activations.shape
    width = blocks[layer]["W_out"].shape[0]
    head_dim = width // num_heads
    zero = dict(recorded, mlp_post={layer: np.zeros_like(activations)})
    shares = second_order_effects_literal(zero, weights, layer)

    effects = np.zeros_like(shares)
    for later in range(layer + 1, len(blocks)):
        block = blocks[later]
        for h in range(num_heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            # U[:, n] = P^T (g_p * (W_O[h] W_V[h] (g1 * w_n))), for all n at once: [d, N].
            basis = weights["P"].T @ (weights["g_p"][:, None] * (
                block["W_O"][:, rows] @ block["W_V"][rows]
                @ (block["g1"][:, None] * blocks[layer]["W_out"])))
            for b in range(batch):
                pattern = recorded["attn_class"][later][b, h] / recorded["ln1_scale"][later][b]
                coefficients = pattern @ activations[b]  # c[later, h, :], [N]
                effects[b] += (coefficients[:, None] * basis.T) * (
                    100.0 / (np.linalg.norm(recorded["embedding"][b])
                             * recorded["ln_post_scale"][b]))
    return effects + shares


def check_recording_rebuilds_model(recording: dict, weights: dict, label: str) -> None:
    """Check the recorded statistics, attention weights and weight slices against the model.

    Steps 2-5 of the lens applied to the whole residual stream (every share count 1) must give
    each block's attention output at the class token and the embedding. That ties the LN
    statistics, the head layout of W_V and W_O, the attention weights and P to what the
    reference library computed.
    """
    num_heads = weights["heads"]
    for index, block in enumerate(weights["blocks"]):
        record = recording["blocks"][index]
        x = record["residual_in"].double().numpy()  # [B, T, D]
        mean = record["ln1_mean"].numpy()[..., None]
        scale = record["ln1_scale"].numpy()[..., None]
        pattern = record["attn_class"].double().numpy()  # [B, H, T]
        head_dim = x.shape[-1] // num_heads
        u = block["g1"] * (x - mean) / scale + block["be1"]
        out = np.tile(block["b_O"], (x.shape[0], 1))
        for h in range(num_heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            v = u @ block["W_V"][rows].T + block["b_V"][rows]  # [B, T, e]
            o = np.einsum("bt,bte->be", pattern[:, h], v)
            out += o @ block["W_O"][:, rows].T
        assert_close(out, record["attn_out_class"], 1e-5, f"{label}: block {index} attention")

    x = recording["ln_post_in"].double().numpy()
    mean = recording["ln_post_mean"].numpy()[:, None]
    scale = recording["ln_post_scale"].numpy()[:, None]
    embedding = (weights["g_p"] * (x - mean) / scale + weights["be_p"]) @ weights["P"]
    assert_close(embedding, recording["embedding"], 1e-5, f"{label}: embedding")


# ---------------------------------------------------------------------------------------------
# Output


def save_npy(path: Path, value) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    np.save(path, np.ascontiguousarray(value, dtype=np.float32))


def write_expected(directory: Path, pixels: torch.Tensor, tokens: torch.Tensor,
                   text_embedding: torch.Tensor, recording: dict, weights: dict,
                   label: str) -> None:
    """Write `expected/` for one model. The checks run before any file is written."""
    check_recording_rebuilds_model(recording, weights, label)

    # Everything below reads the recording back from float32, exactly as the Rust tests see it.
    def as_written(t):
        return t.detach().float().double().numpy()

    recorded = {
        "mlp_post": {i: as_written(r["mlp_post"]) for i, r in enumerate(recording["blocks"])},
        "ln1_mean": [as_written(r["ln1_mean"]) for r in recording["blocks"]],
        "ln1_scale": [as_written(r["ln1_scale"]) for r in recording["blocks"]],
        "attn_class": [as_written(r["attn_class"]) for r in recording["blocks"]],
        "ln_post_mean": as_written(recording["ln_post_mean"]),
        "ln_post_scale": as_written(recording["ln_post_scale"]),
        "embedding": as_written(recording["embedding"]),
    }
    effects = {}
    for layer in EFFECT_LAYERS:
        effects[layer] = second_order_effects_literal(recorded, weights, layer)
        factorized = second_order_effects_factorized(recorded, weights, layer)
        assert_close(factorized, effects[layer], 1e-10, f"{label}: factorized effects of block {layer}")

    expected = directory / "expected"
    expected.mkdir(parents=True, exist_ok=True)
    save_npy(expected / "input.npy", pixels)
    save_npy(expected / "embedding.npy", recording["embedding"])
    save_npy(expected / "text_tokens.npy", tokens)
    save_npy(expected / "text_embedding.npy", text_embedding)
    for index, record in enumerate(recording["blocks"]):
        save_npy(expected / f"blocks.{index}.mlp.hook_post.npy", record["mlp_post"])
        save_npy(expected / f"blocks.{index}.ln1.hook_mean.npy", record["ln1_mean"])
        save_npy(expected / f"blocks.{index}.ln1.hook_scale.npy", record["ln1_scale"])
        save_npy(expected / f"blocks.{index}.attn.hook_pattern_class.npy", record["attn_class"])
    save_npy(expected / "ln_post.hook_mean.npy", recording["ln_post_mean"])
    save_npy(expected / "ln_post.hook_scale.npy", recording["ln_post_scale"])
    for layer, value in effects.items():
        save_npy(expected / f"effects_layer{layer}.npy", value)
    print(f"{label}: wrote {expected.relative_to(ROOT)}")


def seeded_inputs() -> tuple:
    """Return the pixel batch [B, 3, 32, 32] and token batch [B, 77] shared by every model.

    Each token row is a start token, random ids, an end token and zero padding. The end token has
    the largest id, where both libraries pool. The last row fills all 77 positions.
    """
    rng = np.random.default_rng(SEED_INPUTS)
    pixels = rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    tokens = np.zeros((BATCH, 77), dtype=np.int64)
    for row, length in enumerate((3, 12, 77)):
        tokens[row, 0] = START_TOKEN
        tokens[row, 1:length - 1] = rng.integers(1, START_TOKEN, size=length - 2)
        tokens[row, length - 1] = END_TOKEN
    return torch.from_numpy(pixels), torch.from_numpy(tokens)


def build_open_clip(model_config: dict, seed: int) -> open_clip.model.CLIP:
    model = open_clip.model.CLIP(
        model_config["embed_dim"],
        vision_cfg=model_config["vision_cfg"],
        text_cfg=model_config["text_cfg"],
        quick_gelu=model_config.get("quick_gelu", False),
    )
    randomize_parameters(model, seed)
    return model.eval()


def write_open_clip_model(directory: Path, model: open_clip.model.CLIP, config_json: dict,
                          weights_name: str, dtype: torch.dtype, pixels, tokens) -> None:
    """Write one open_clip model directory. The expected outputs come from the float32 model
    with its weights rounded to `dtype`."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    state = model.state_dict()
    rounded = round_state_dict(state, dtype)
    save_safetensors(rounded, directory / weights_name)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")

    model.load_state_dict({name: t.float() for name, t in rounded.items()})
    recording = record_open_clip(model, pixels)
    with torch.no_grad():
        text_embedding = model.encode_text(tokens, normalize=False)
    write_expected(directory, pixels, tokens.float(), text_embedding, recording,
                   lens_weights_open_clip(model), directory.name)
    model.load_state_dict(state)


def check_open_clip_loads_directory(directory: Path, pixels, expected: torch.Tensor) -> None:
    """Check that open_clip's own loader (`local-dir:` with an open_clip_config.json) reads the
    config and weights of `directory` and reproduces the embedding."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        shutil.copy(directory / "config.json", scratch / "open_clip_config.json")
        shutil.copy(directory / "model.safetensors", scratch / "model.safetensors")
        model = open_clip.create_model(f"local-dir:{scratch}").eval()
        with torch.no_grad():
            embedding = model.encode_image(pixels)
    assert_close(embedding, expected, 1e-6, f"{directory.name}: open_clip local-dir load")


def write_hugging_face_model(directory: Path, pixels, tokens) -> None:
    model = transformers.CLIPModel(hf_clip_config())
    randomize_parameters(model, SEED_HF)
    model.eval()

    if directory.exists():
        shutil.rmtree(directory)
    # transformers 5 always writes safetensors and has no safe_serialization argument.
    if transformers.__version__.startswith("4."):
        model.save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory)
    for path in directory.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            path.unlink()

    # Record from the saved files, which also checks that they load. The eager attention
    # implementation returns the attention weights; the default (sdpa) one does not.
    loaded = transformers.CLIPModel.from_pretrained(directory, attn_implementation="eager").eval()
    recording = record_hugging_face(loaded, pixels)
    with torch.no_grad():
        default_embedding = projected_features(model.get_image_features(pixel_values=pixels))
        text_embedding = projected_features(loaded.get_text_features(input_ids=tokens))
    assert_close(recording["embedding"], default_embedding, 1e-5,
                 "hf-clip: eager against default attention")
    write_expected(directory, pixels, tokens.float(), text_embedding, recording,
                   lens_weights_hugging_face(loaded), directory.name)


def write_shape_configs() -> None:
    """Write the two ViT-B/32 config files: numbers as documented by open_clip
    (model_configs/ViT-B-32.json) and by openai/clip-vit-base-patch32's config.json."""
    open_clip_b32 = {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                     "layers": 12},
    }
    hf_b32 = {
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": 512,
        "text_config": {
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": 2,
            "hidden_act": "quick_gelu",
            "hidden_size": 512,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 2048,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 8,
            "num_hidden_layers": 12,
            "pad_token_id": 1,
            "projection_dim": 512,
            "vocab_size": 49408,
        },
        "torch_dtype": "float32",
        "vision_config": {
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "hidden_act": "quick_gelu",
            "hidden_size": 768,
            "image_size": 224,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model",
            "num_attention_heads": 12,
            "num_channels": 3,
            "num_hidden_layers": 12,
            "patch_size": 32,
            "projection_dim": 512,
        },
    }
    (OUT / "openclip-b32-shaped-config.json").write_text(json.dumps(open_clip_b32, indent=2) + "\n")
    (OUT / "hf-b32-config.json").write_text(json.dumps(hf_b32, indent=2) + "\n")

    # Both must be accepted by the reference libraries' own config classes.
    vision = open_clip.model.CLIPVisionCfg(**open_clip_b32["vision_cfg"])
    assert vision.width // vision.head_width == 12
    hf_config = transformers.CLIPConfig.from_dict(hf_b32)
    assert hf_config.vision_config.hidden_size == 768
    assert hf_config.text_config.hidden_size == 512


def main() -> None:
    torch.manual_seed(0)
    # One thread: the models are tiny, and a fixed reduction order keeps reruns bit-identical.
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    pixels, tokens = seeded_inputs()

    config = open_clip_model_config(quick_gelu=True)
    model = build_open_clip(config, SEED_OPENCLIP_QUICKGELU)
    for suffix, weights_name, dtype in (("", "model.safetensors", torch.float32),
                                        ("-f16", "model-f16.safetensors", torch.float16),
                                        ("-bf16", "model-bf16.safetensors", torch.bfloat16)):
        write_open_clip_model(OUT / f"openclip-quickgelu{suffix}", model, config, weights_name,
                              dtype, pixels, tokens)

    config = open_clip_model_config(quick_gelu=False)
    model = build_open_clip(config, SEED_OPENCLIP_GELU)
    hub_config = {
        "model_cfg": config,
        "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD,
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    directory = OUT / "openclip-gelu"
    write_open_clip_model(directory, model, hub_config, "model.safetensors", torch.float32,
                          pixels, tokens)
    check_open_clip_loads_directory(directory, pixels,
                                    torch.from_numpy(np.load(directory / "expected" / "embedding.npy")))

    write_hugging_face_model(OUT / "hf-clip", pixels, tokens)
    write_shape_configs()

    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fixtures/models: {total / 1e6:.2f} MB; open_clip {open_clip.__version__}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()

//! `clip-lens`: the engine on the command line. Runs CLIP's vision tower and the second-order
//! lens natively, on the CPU by default or on a GPU through wgpu.

mod atlas;
mod bench;
mod bench_omp;
mod bench_text;
mod text;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use engine::analysis::top_k;
use engine::lens::Lens;
use engine::model::{ClipModel, RecordOptions};
use engine::npy::{self, Array};
use engine::random::StorageType;
use engine::weights::Naming;
use engine::{ClipConfig, Device, Tensor};

#[derive(Parser)]
#[command(name = "clip-lens", version, about = "Explain CLIP's neurons with the second-order lens")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the model input for an image: CLIP-normalized float32 [3, S, S].
    Preprocess {
        #[command(flatten)]
        model: ModelArgs,
        /// Image file (PNG, JPEG, GIF, WebP, BMP or TIFF; the format is read from the bytes).
        #[arg(long)]
        image: PathBuf,
        /// Output .npy file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the unnormalized image embedding, float32 [d].
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        input: InputArgs,
        #[command(flatten)]
        device: DeviceArgs,
        /// Output .npy file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the second-order effects of one block's neurons, float32 [N, d], and print the 20
    /// neurons with the largest effect norm.
    Effects {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        input: InputArgs,
        #[command(flatten)]
        device: DeviceArgs,
        /// Source block (0-based); it needs a later block, so at most layers - 2.
        #[arg(long)]
        layer: usize,
        /// Output .npy file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure forward-pass and lens time per image.
    Bench(bench::BenchArgs),
    /// Measure the sparse text decomposition (dictionary and OMP) on a random pool.
    BenchOmp(bench_omp::BenchOmpArgs),
    /// Measure text embedding of a vocabulary, truncated after the end-of-text token against the
    /// full 77-token context.
    BenchText(bench_text::BenchTextArgs),
    /// Write a model directory with seeded random weights (OpenAI naming, open_clip config by
    /// default) for tests and for the page's embedded default model.
    RandomModel {
        /// Shape preset: ViT-B-32, ViT-B-16, ViT-L-14, or the small test presets tiny and small.
        #[arg(long)]
        preset: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory; created if missing.
        #[arg(long)]
        out: PathBuf,
        /// Storage type of the weights.
        #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
        dtype: String,
        /// Tensor names and config format: openai (open_clip config) or hf (Hugging Face CLIPModel).
        #[arg(long, default_value = "openai", value_parser = ["openai", "hf"])]
        naming: String,
    },
    /// Build a neuron atlas: per-neuron statistics of the second-order lens over an image set
    /// (mean effects, thresholds, top images, principal directions, classes and text terms).
    #[command(after_help = atlas::HELP)]
    Atlas(atlas::AtlasArgs),
    /// Merge partial files of `clip-lens atlas --stage means` or `--stage top` from several shards.
    AtlasMerge(atlas::MergeArgs),
    /// Print the token ids of a text as open_clip.tokenize gives them, without the zero padding.
    #[command(after_help = text::TOKENIZER_HELP)]
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        /// Text to tokenize.
        #[arg(long)]
        text: String,
    },
    /// Write unit-normalized text embeddings from the text tower, float32 [n, d].
    #[command(after_help = text::TOKENIZER_HELP)]
    EmbedText {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        input: text::TextInput,
        #[command(flatten)]
        device: DeviceArgs,
        /// Output .npy file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory: config.json (open_clip or Hugging Face format) plus one .safetensors file.
    #[arg(long)]
    model: PathBuf,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct InputArgs {
    /// Image file to preprocess with CLIP's transform.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Already preprocessed input, float32 [3, S, S] (or [1, 3, S, S]) .npy.
    #[arg(long)]
    input: Option<PathBuf>,
}

#[derive(Args)]
pub struct DeviceArgs {
    /// The device the engine runs on: cpu (burn's pure-Rust backend) or gpu (wgpu: Vulkan, Metal or DX12).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceKind {
    Cpu,
    Gpu,
}

impl DeviceArgs {
    pub fn init(&self) -> Result<Device> {
        match self.device {
            DeviceKind::Cpu => Ok(Device::flex()),
            DeviceKind::Gpu => {
                let gpu = engine::device::gpu()
                    .context("no usable GPU adapter through wgpu (Vulkan, Metal or DX12); use --device cpu")?;
                eprintln!("using {} ({}, {})", gpu.adapter, gpu.backend, gpu.device_type);
                Ok(gpu.device)
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Preprocess { model, image, out } => {
            let config = read_config(&model.model)?;
            let pixels = preprocess_image(&image, config.vision.image_size)?;
            let size = config.vision.image_size;
            write_npy(&out, Array::new(vec![3, size, size], pixels))
        }
        Command::Embed { model, input, device, out } => {
            let device = device.init()?;
            let model = load_model(&model.model, &device)?;
            let pixels = model_input(&input, &model)?;
            let output = model.vision.forward(pixels, &RecordOptions::default());
            let embedding = host(output.embedding)?;
            write_npy(&out, Array::new(vec![embedding.len()], embedding))
        }
        Command::Effects { model, input, device, layer, out } => {
            let device = device.init()?;
            let model = load_model(&model.model, &device)?;
            let layers = model.config.vision.layers;
            if layer + 1 >= layers {
                bail!("--layer {layer} has no later block in this {layers}-block model; use 0 to {}", layers - 2);
            }
            let lens = Lens::new(&model.vision, &[layer])?;
            let pixels = model_input(&input, &model)?;
            let output = model.vision.forward(pixels, &RecordOptions::lens(&[layer]));
            let recording = output.recording.as_ref().expect("lens recording was requested");
            let coefficients = lens.coefficients(&output.embedding, recording, layer)?;
            let norms = host(lens.effect_norms(&coefficients)?)?;
            let effects = host(lens.effects(&coefficients)?)?;
            let (neurons, embed_dim) = (model.config.vision.mlp_dim, model.config.embed_dim);
            write_npy(&out, Array::new(vec![neurons, embed_dim], effects))?;

            println!("block {layer}: the 20 neurons with the largest second-order effect norm");
            println!("{:>6}  {:>10}", "neuron", "norm");
            for n in top_k(&norms, 20) {
                println!("{n:>6}  {:>10.4}", norms[n]);
            }
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::BenchOmp(args) => bench_omp::run(args),
        Command::BenchText(args) => bench_text::run(args),
        Command::Atlas(args) => atlas::run(args),
        Command::AtlasMerge(args) => atlas::merge(args),
        Command::RandomModel { preset, seed, out, dtype, naming } => {
            let config = ClipConfig::preset(&preset)?;
            let dtype: StorageType = dtype.parse()?;
            let naming = if naming == "hf" { Naming::HuggingFace } else { Naming::OpenAi };
            engine::random::write_model_dir(&out, &config, seed, naming, dtype)?;
            println!("wrote {} ({preset}, seed {seed}) to {}", "random model", out.display());
            Ok(())
        }
        Command::Tokenize { model, text: input } => text::tokenize(&model.model, &input),
        Command::EmbedText { model, input, device, out } => {
            let device = device.init()?;
            text::embed_text(&model.model, &input, &device, &out)
        }
    }
}

/// Finds the config and the weights file of a model directory, with a clear error when the
/// directory is missing.
pub fn model_dir_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    if !dir.exists() {
        bail!("{} does not exist; --model needs a model directory (config.json and one .safetensors file)", dir.display());
    }
    Ok(engine::weights::model_dir_files(dir)?)
}

/// Reads and parses the config of a model directory.
pub fn read_config(dir: &Path) -> Result<ClipConfig> {
    let (config_path, _) = model_dir_files(dir)?;
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    Ok(ClipConfig::from_json(&text).map_err(|e| e.in_file(&config_path))?)
}

/// Loads a model directory.
pub fn load_model(dir: &Path, device: &Device) -> Result<ClipModel> {
    Ok(engine::weights::load_model_dir(dir, device)?)
}

fn preprocess_image(path: &Path, size: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let preprocessed =
        engine::image::preprocess(&bytes, size).with_context(|| format!("{}", path.display()))?;
    Ok(preprocessed.pixels)
}

fn model_input(input: &InputArgs, model: &ClipModel) -> Result<Tensor<4>> {
    let size = model.config.vision.image_size;
    let pixels = match (&input.image, &input.input) {
        (Some(image), _) => preprocess_image(image, size)?,
        (None, Some(path)) => {
            let array = npy::read(path)?;
            let expected_3 = [3, size, size];
            let expected_4 = [1, 3, size, size];
            if array.shape != expected_3 && array.shape != expected_4 {
                bail!(
                    "{}: input has shape {:?}; this model expects {expected_3:?} (CLIP-normalized pixels)",
                    path.display(),
                    array.shape
                );
            }
            array.data
        }
        (None, None) => bail!("give --image FILE or --input FILE.npy"),
    };
    Ok(model.vision.input_tensor(pixels, 1)?)
}

pub fn host<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>> {
    Ok(pollster::block_on(engine::analysis::read(tensor))?)
}

fn write_npy(path: &Path, array: Array) -> Result<()> {
    npy::write(path, &array)?;
    eprintln!("wrote {} {:?}", path.display(), array.shape);
    Ok(())
}

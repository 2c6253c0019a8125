//! `clip-lens bench-text`: time to embed a vocabulary with the text tower, with each sequence cut
//! right after its end-of-text token, against the padded 77-token computation.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use engine::random::{generate, StorageType};
use engine::text::load_text;
use engine::weights::{Naming, WeightFile};
use engine::ClipConfig;

use crate::text::load_tokenizer;
use crate::DeviceArgs;

#[derive(Args)]
pub struct BenchTextArgs {
    /// Shape preset measured with seeded random weights.
    #[arg(long, default_value = "ViT-B-32")]
    preset: String,
    /// Text file with one text per line (default: the vocabulary built into this binary).
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Texts embedded with truncation (the first N lines of the file).
    #[arg(long, default_value_t = 30_000)]
    texts: usize,
    /// Texts also embedded at the full context of 77 tokens; the full-context time for all
    /// texts is extrapolated from them.
    #[arg(long, default_value_t = 512)]
    full_sample: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = engine::text::DEFAULT_BATCH_SIZE)]
    batch: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

/// The default text pool, built into the binary.
const BUILT_IN_VOCABULARY: &str = include_str!("../../assets/vocabulary.txt");

pub fn run(args: BenchTextArgs) -> Result<()> {
    if args.texts == 0 || args.batch == 0 {
        bail!("--texts and --batch must be at least 1");
    }
    let pool = match &args.file {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
        None => BUILT_IN_VOCABULARY.to_string(),
    };
    let texts: Vec<&str> = pool.lines().filter(|line| !line.trim().is_empty()).take(args.texts).collect();
    if texts.len() < args.texts {
        eprintln!("note: the pool has {} texts, fewer than --texts {}", texts.len(), args.texts);
    }

    let device = args.device.init()?;
    let config = ClipConfig::preset(&args.preset)?;
    let generated = generate(&config, 0, Naming::OpenAi, StorageType::F32)?;
    let file = WeightFile::parse(&generated.safetensors, &args.preset)?;
    let tower = load_text(&file, &config, &device)?;
    let tokenizer = load_tokenizer(std::path::Path::new("."), &config)?;

    let tokens = tokenizer.encode_batch(&texts)?;
    let mean_length = tokens.iter().map(Vec::len).sum::<usize>() as f64 / tokens.len() as f64;

    // Warm-up, so that neither timing includes one-time kernel setup.
    tower.embed_batched(&tokens[..tokens.len().min(8)], args.batch)?.into_data();

    let started = Instant::now();
    tower.embed_batched(&tokens, args.batch)?.into_data();
    let truncated_s = started.elapsed().as_secs_f64();

    let sample = &tokens[..tokens.len().min(args.full_sample.max(1))];
    let started = Instant::now();
    for chunk in sample.chunks(args.batch) {
        tower.embed_full(chunk)?.into_data();
    }
    let sample_s = started.elapsed().as_secs_f64();
    let full_s = sample_s * tokens.len() as f64 / sample.len() as f64;

    println!(
        "{}",
        serde_json::json!({
            "preset": args.preset,
            "texts": tokens.len(),
            "mean_tokens": mean_length,
            "truncated_s": truncated_s,
            "full_context_sample": sample.len(),
            "full_context_s_extrapolated": full_s,
            "speedup": full_s / truncated_s,
        })
    );
    Ok(())
}

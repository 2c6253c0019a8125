//! The `tokenize` and `embed-text` commands: CLIP's tokenizer and text tower.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use engine::npy::{self, Array};
use engine::tokenizer::ClipTokenizer;
use engine::{ClipConfig, Device};

/// CLIP's tokenizer (tools/make_tokenizer.py converts open_clip's BPE merges into it), built into
/// the binary so that a model directory needs no tokenizer file.
const BUILT_IN_TOKENIZER: &[u8] = include_bytes!("../../assets/clip-tokenizer.json");

/// Help text shared by both commands.
pub const TOKENIZER_HELP: &str = "The tokenizer is DIR/tokenizer.json when that file exists \
    (a Hugging Face tokenizer.json with CLIP's vocabulary), otherwise CLIP's tokenizer built \
    into this binary. Texts are cleaned as open_clip does (ftfy fixes except mojibake repair, \
    HTML unescaping, whitespace collapse, lowercase).";

#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct TextInput {
    /// One text to embed.
    #[arg(long)]
    text: Option<String>,
    /// UTF-8 file with one text per line; every line, empty ones included, gives one row.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
}

/// Loads `model_dir/tokenizer.json`, or the built-in tokenizer when the directory has none, with
/// the context length of the model's config.
pub fn load_tokenizer(model_dir: &Path, config: &ClipConfig) -> Result<ClipTokenizer> {
    let path = model_dir.join("tokenizer.json");
    let tokenizer = if path.is_file() {
        ClipTokenizer::from_file(&path)?
    } else {
        ClipTokenizer::from_bytes(BUILT_IN_TOKENIZER, "the built-in CLIP tokenizer")?
    };
    Ok(tokenizer.with_context_length(config.text.context_length)?)
}

/// Prints the token ids of `text` on one line: start id, word ids, end id, without padding.
pub fn tokenize(model_dir: &Path, text: &str) -> Result<()> {
    let config = crate::read_config(model_dir)?;
    let tokenizer = load_tokenizer(model_dir, &config)?;
    let ids = tokenizer.encode(text)?;
    let line: Vec<String> = ids.iter().map(u32::to_string).collect();
    println!("{}", line.join(" "));
    Ok(())
}

/// Embeds the input texts with the model's text tower and writes the unit-normalized
/// embeddings, float32 [n, d], to `out`.
pub fn embed_text(model_dir: &Path, input: &TextInput, device: &Device, out: &Path) -> Result<()> {
    let texts: Vec<String> = match (&input.text, &input.file) {
        (Some(text), _) => vec![text.clone()],
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {} (expected UTF-8 text)", path.display()))?
            .lines()
            .map(str::to_string)
            .collect(),
        (None, None) => anyhow::bail!("give --text TEXT or --file FILE"),
    };

    let config = crate::read_config(model_dir)?;
    let tokenizer = load_tokenizer(model_dir, &config)?;
    let started = Instant::now();
    let tower = engine::text::load_text_from_dir(model_dir, device)?;
    log_stage("loaded the text tower", started);

    let started = Instant::now();
    let embeddings = tower.embed_texts_normalized(&tokenizer, &texts)?;
    let values = crate::host(embeddings)?;
    let noun = if texts.len() == 1 { "text" } else { "texts" };
    log_stage(&format!("embedded {} {noun}", texts.len()), started);

    let array = Array::new(vec![texts.len(), tower.embed_dim()], values);
    npy::write(out, &array)?;
    eprintln!("wrote {} {:?}", out.display(), array.shape);
    Ok(())
}

fn log_stage(stage: &str, started: Instant) {
    eprintln!("{stage} in {:.2} s", started.elapsed().as_secs_f64());
}

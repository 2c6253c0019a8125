//! `clip-lens atlas` and `clip-lens atlas-merge`: per-neuron statistics of the second-order lens
//! over an image set, written in the atlas format (docs/atlas-format.md).

mod cache;
mod images;
mod output;
pub mod throughput;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use engine::atlas::partial::Partial;
use engine::atlas::{
    BlockMeans, BlockShape, MeansState, ScaledCoefficients, Shard, SkippedImage, StatisticsSource, TopState,
};
use engine::lens::{default_layers, Lens};
use engine::model::{ClipModel, RecordOptions};
use engine::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::{load_model, DeviceArgs, DeviceKind};

use cache::{CacheReader, CacheWriter};

/// Help text after the options of `clip-lens atlas`.
pub const HELP: &str = "\
Stages: by default (--stage all) the command runs both passes over the images and writes the
atlas directory. For large image sets, split the passes into shards (shard i/n takes the images
at indices i, i + n, i + 2n, ... of the sorted image list) and merge their partial files:

  clip-lens atlas ARGS --stage means --shard 0/3 --out means-0.part     (and 1/3, 2/3)
  clip-lens atlas-merge means-0.part means-1.part means-2.part --out means.part
  clip-lens atlas ARGS --stage top --shard 0/3 --means means.part --out top-0.part
  clip-lens atlas-merge top-0.part top-1.part top-2.part --out top.part
  clip-lens atlas ARGS --stage finish --top top.part --out ATLAS

ARGS must be the same in every stage: --model, --images, --layers and --k.
docs/atlas-format.md describes the atlas and the statistics.";

/// Largest number of text terms per neuron.
const MAX_TERMS: usize = 128;

/// Name of the coefficient cache that `--stage all` keeps in the output directory while it runs.
const TEMPORARY_CACHE: &str = ".coefficients.cache";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Stage {
    /// Both passes and the atlas, in one process.
    All,
    /// Pass 1 on one shard: sums for the means; writes a partial file.
    Means,
    /// Pass 2 on one shard: top images and norm sums, given the merged means; writes a partial file.
    Top,
    /// Directions, class alignment and text terms from the merged top partial; writes the atlas.
    Finish,
}

#[derive(Args)]
pub struct AtlasArgs {
    /// Model directory: config.json (open_clip or Hugging Face format) plus one .safetensors file.
    #[arg(long)]
    model: PathBuf,
    /// Image folder, searched recursively for jpg, jpeg, png, gif, webp, bmp, tif and tiff files.
    #[arg(long)]
    images: PathBuf,
    /// Output: the atlas directory (stages all and finish) or the partial file (means and top).
    #[arg(long)]
    out: PathBuf,
    /// Source blocks, comma-separated and 0-based [default: the last three blocks that have a
    /// later block, e.g. 8,9,10 for 12 blocks].
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Top images kept per neuron; the k-th largest centered norm is the neuron's threshold.
    #[arg(long, default_value_t = engine::atlas::DEFAULT_TOP_IMAGES)]
    k: usize,
    /// Text terms per neuron chosen by orthogonal matching pursuit (1 to 128).
    #[arg(long, default_value_t = 32)]
    terms: usize,
    /// Text pool for the terms, one text per line [default: the built-in list of 30,000 words].
    #[arg(long)]
    vocabulary: Option<PathBuf>,
    /// Classes and prompt templates as JSON in the layout of assets/imagenet.json ("classes",
    /// "templates" with one {} for the class name, "source", "license") [default: the built-in
    /// ImageNet classes and OpenAI's 80 templates].
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Use only the first N templates per class embedding [default: all].
    #[arg(long)]
    templates: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[command(flatten)]
    device: DeviceArgs,
    /// Part of the computation to run (see the stages below).
    #[arg(long, value_enum, default_value_t = Stage::All)]
    stage: Stage,
    /// The shard this process computes, INDEX/COUNT such as 0/3 (stages means and top).
    #[arg(long, value_parser = parse_shard)]
    shard: Option<Shard>,
    /// The merged means partial file (stage top).
    #[arg(long)]
    means: Option<PathBuf>,
    /// The merged top partial file (stage finish).
    #[arg(long)]
    top: Option<PathBuf>,
    /// Coefficient cache file: pass 1 writes every image's lens coefficients to it and pass 2
    /// reads them instead of running the model again. Stage all uses a temporary one in the
    /// output directory unless --no-cache; stages means and top use one only when given.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Run the model again in pass 2 instead of caching the coefficients (stage all).
    #[arg(long, conflicts_with = "cache")]
    no_cache: bool,
}

fn parse_shard(text: &str) -> std::result::Result<Shard, String> {
    Shard::parse(text).map_err(|e| e.to_string())
}

#[derive(Args)]
pub struct MergeArgs {
    /// Partial files of one stage (all means or all top), each for other shards.
    #[arg(required = true)]
    partials: Vec<PathBuf>,
    /// Output partial file.
    #[arg(long)]
    out: PathBuf,
}

impl AtlasArgs {
    fn validate(&self) -> Result<()> {
        if self.batch == 0 {
            bail!("--batch must be at least 1");
        }
        if self.k == 0 {
            bail!("--k must be at least 1");
        }
        if !(1..=MAX_TERMS).contains(&self.terms) {
            bail!("--terms {} is out of range; use 1 to {MAX_TERMS}", self.terms);
        }
        if self.templates == Some(0) {
            bail!("--templates must be at least 1");
        }
        if let Some(layers) = &self.layers {
            for (i, layer) in layers.iter().enumerate() {
                if layers[..i].contains(layer) {
                    bail!("--layers: block {layer} is given twice");
                }
            }
        }

        let stage = self.stage;
        let only = |given: bool, option: &str, stages: &str| -> Result<()> {
            if given {
                bail!("{option} applies only to --stage {stages}");
            }
            Ok(())
        };
        only(self.shard.is_some() && matches!(stage, Stage::All | Stage::Finish), "--shard", "means and top")?;
        only(self.means.is_some() && stage != Stage::Top, "--means", "top")?;
        only(self.top.is_some() && stage != Stage::Finish, "--top", "finish")?;
        only(self.cache.is_some() && stage == Stage::Finish, "--cache", "all, means and top")?;
        only(self.no_cache && stage != Stage::All, "--no-cache", "all")?;

        if stage == Stage::Top && self.means.is_none() {
            bail!("--stage top needs --means FILE, the merged partial file of --stage means");
        }
        if stage == Stage::Finish && self.top.is_none() {
            bail!("--stage finish needs --top FILE, the merged partial file of --stage top");
        }
        Ok(())
    }
}

/// Inputs of every stage: the image list, the model with its lens, and the statistics' source.
pub struct Setup {
    pub root: PathBuf,
    /// Image paths relative to `root`, sorted.
    pub paths: Vec<String>,
    pub model_dir: PathBuf,
    pub model: ClipModel,
    pub lens: Lens,
    pub shapes: Vec<BlockShape>,
    pub source: StatisticsSource,
    pub device: Device,
    /// `cpu` or the GPU adapter's name.
    pub device_name: String,
}

impl Setup {
    fn new(args: &AtlasArgs) -> Result<Setup> {
        let paths = images::list(&args.images)?;
        if paths.is_empty() {
            bail!(
                "found no image files under {} (looked for {})",
                args.images.display(),
                images::EXTENSIONS.join(", ")
            );
        }
        let images_sha256 = engine::assets::sha256_hex(&engine::assets::encode_lines(&paths));

        let (device, device_name) = init_device(&args.device)?;
        let (_, weights_path) = crate::model_dir_files(&args.model)?;
        let weights = std::fs::read(&weights_path).with_context(|| format!("cannot read {}", weights_path.display()))?;
        let weights_sha256 = engine::assets::sha256_hex(&weights);
        drop(weights);
        let model = load_model(&args.model, &device)?;

        let total = model.config.vision.layers;
        let mut layers = args.layers.clone().unwrap_or_else(|| default_layers(total));
        // `validate` has rejected duplicate blocks.
        layers.sort_unstable();
        if layers.is_empty() {
            bail!("a {total}-block model has no block with a later block to analyse");
        }
        if let Some(&layer) = layers.iter().find(|&&l| l + 1 >= total) {
            bail!("--layers: block {layer} has no later block in this {total}-block model; use 0 to {}", total - 2);
        }
        let started = Instant::now();
        let lens = Lens::new(&model.vision, &layers)?;
        let shapes = BlockShape::of_lens(&lens)?;
        eprintln!("built the lens basis for blocks {layers:?} in {:.2} s", started.elapsed().as_secs_f64());

        let source = StatisticsSource { weights_sha256, images_sha256, images_listed: paths.len(), layers };
        Ok(Setup {
            root: args.images.clone(),
            paths,
            model_dir: args.model.clone(),
            model,
            lens,
            shapes,
            source,
            device,
            device_name,
        })
    }

    /// Returns the header that identifies a coefficient cache of `shard`.
    fn cache_header(&self, shard: Shard) -> serde_json::Value {
        json!({ "source": self.source, "shard": shard, "blocks": self.shapes })
    }
}

fn init_device(args: &DeviceArgs) -> Result<(Device, String)> {
    match args.device {
        DeviceKind::Cpu => Ok((Device::flex(), "cpu".to_string())),
        DeviceKind::Gpu => {
            let gpu = engine::device::gpu()
                .context("no usable GPU adapter through wgpu (Vulkan, Metal or DX12); use --device cpu")?;
            eprintln!("using {} ({}, {})", gpu.adapter, gpu.backend, gpu.device_type);
            Ok((gpu.device, gpu.adapter))
        }
    }
}

/// Runs one stage of `clip-lens atlas`.
pub fn run(args: AtlasArgs) -> Result<()> {
    let started = Instant::now();
    args.validate()?;
    // The classes and the vocabulary are needed only at the end, but reading them first finds a
    // bad file before the passes over the images.
    let texts = match args.stage {
        Stage::All | Stage::Finish => Some(output::TextInputs::read(&args)?),
        Stage::Means | Stage::Top => None,
    };
    let setup = Setup::new(&args)?;
    let shard = args.shard.unwrap_or(Shard::WHOLE);
    let mut timings = Timings::default();

    match args.stage {
        Stage::Means => {
            let state = pass_one(&setup, args.batch, shard, args.cache.as_deref(), &mut timings)?;
            let coverage = state.coverage.clone();
            write_partial(&args.out, &Partial::Means(state))?;
            println!(
                "pass 1 (means) of shard {shard}: {} images used, {} skipped; wrote {}",
                coverage.images,
                coverage.skipped.len(),
                args.out.display()
            );
        }
        Stage::Top => {
            let path = args.means.as_ref().expect("validated");
            let Partial::Means(means) = read_partial(path)? else {
                bail!("{} is a top partial file; --means needs the merged means file", path.display());
            };
            check_source(&setup, &means.source, path)?;
            let block_means = means.means().with_context(|| format!("in {}", path.display()))?;
            let skipped: Vec<SkippedImage> =
                means.coverage.skipped.iter().filter(|s| shard.contains(s.index)).cloned().collect();
            let cache = args.cache.as_deref();
            let state = pass_two(&setup, args.batch, args.k, shard, block_means, cache, skipped, &mut timings)?;
            let coverage = state.coverage.clone();
            write_partial(&args.out, &Partial::Top(state))?;
            println!(
                "pass 2 (top images) of shard {shard}: {} images used, {} skipped; wrote {}",
                coverage.images,
                coverage.skipped.len(),
                args.out.display()
            );
        }
        Stage::Finish => {
            let path = args.top.as_ref().expect("validated");
            let Partial::Top(top) = read_partial(path)? else {
                bail!("{} is a means partial file; --top needs the merged top file", path.display());
            };
            check_source(&setup, &top.source, path)?;
            if top.k != args.k {
                bail!("{} keeps k = {} top images, but --k is {}; pass --k {}", path.display(), top.k, args.k, top.k);
            }
            top.coverage.require_complete("--stage finish").with_context(|| format!("in {}", path.display()))?;
            let texts = texts.expect("read for --stage finish");
            let created = output::prepare_directory(&args.out)?;
            let result = output::write_atlas(&setup, &args, texts, &top, &mut timings, started);
            if result.is_err() && created {
                // Removes the directory only when nothing was written into it.
                let _ = std::fs::remove_dir(&args.out);
            }
            result?;
        }
        Stage::All => {
            let listed = setup.paths.len();
            if listed < args.k {
                bail!("found {listed} images under {}, fewer than --k {}; lower --k", args.images.display(), args.k);
            }
            let texts = texts.expect("read for --stage all");
            run_all(&setup, &args, texts, &mut timings, started)?;
        }
    }
    timings.print(started);
    Ok(())
}

/// Runs both passes and writes the atlas (`--stage all`). On failure it removes the temporary
/// coefficient cache, and the output directory when it created it and nothing else was written.
fn run_all(setup: &Setup, args: &AtlasArgs, texts: output::TextInputs, timings: &mut Timings, started: Instant) -> Result<()> {
    let created = output::prepare_directory(&args.out)?;
    let temporary = args.cache.is_none() && !args.no_cache;
    let cache = match (&args.cache, args.no_cache) {
        (Some(path), _) => Some(path.clone()),
        (None, false) => Some(args.out.join(TEMPORARY_CACHE)),
        (None, true) => None,
    };
    let result = run_passes(setup, args, cache.as_deref(), timings);
    if let (true, Some(path)) = (temporary, &cache) {
        if path.exists() {
            if let Err(e) = std::fs::remove_file(path) {
                eprintln!("cannot remove the temporary cache {}: {e}", path.display());
            }
        }
    }
    let result = result.and_then(|top| output::write_atlas(setup, args, texts, &top, timings, started));
    if result.is_err() && created {
        // Removes the directory only when nothing was written into it.
        let _ = std::fs::remove_dir(&args.out);
    }
    result
}

/// Runs pass 1 and pass 2 over all images.
fn run_passes(setup: &Setup, args: &AtlasArgs, cache: Option<&Path>, timings: &mut Timings) -> Result<TopState> {
    let listed = setup.paths.len();
    let means = pass_one(setup, args.batch, Shard::WHOLE, cache, timings)?;
    let used = means.coverage.images;
    if used < args.k as u64 {
        bail!("only {used} of {listed} images could be read, fewer than --k {}; lower --k", args.k);
    }
    let block_means = means.means()?;
    let skipped = means.coverage.skipped.clone();
    pass_two(setup, args.batch, args.k, Shard::WHOLE, block_means, cache, skipped, timings)
}

/// Fails when a partial file was computed for another model, image list or block list.
fn check_source(setup: &Setup, source: &StatisticsSource, path: &Path) -> Result<()> {
    if *source == setup.source {
        return Ok(());
    }
    let what = if source.weights_sha256 != setup.source.weights_sha256 {
        "model weights"
    } else if source.images_sha256 != setup.source.images_sha256 {
        "image list"
    } else {
        "--layers"
    };
    bail!(
        "{} was computed with another {what} than this run: use the same --model, --images and \
         --layers in every stage (file: blocks {:?}, {} images; this run: blocks {:?}, {} images)",
        path.display(),
        source.layers,
        source.images_listed,
        setup.source.layers,
        setup.source.images_listed
    )
}

/// Wall time per stage, printed at the end.
#[derive(Default)]
pub struct Timings {
    stages: Vec<(String, f64)>,
}

impl Timings {
    pub fn record(&mut self, stage: &str, started: Instant) {
        self.stages.push((stage.to_string(), started.elapsed().as_secs_f64()));
    }

    fn print(&self, started: Instant) {
        let parts: Vec<String> = self.stages.iter().map(|(stage, s)| format!("{stage} {s:.1} s")).collect();
        println!("time: {}; total {:.1} s", parts.join(", "), started.elapsed().as_secs_f64());
    }
}

/// Creates a progress bar over `len` items that shows their rate and the remaining time. It is
/// hidden when stderr is not a terminal.
pub fn progress_bar(len: usize, prefix: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    let template = format!("{{prefix:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, {{eta}} left)");
    bar.set_style(ProgressStyle::with_template(&template).expect("a valid template").progress_chars("=> "));
    bar.set_prefix(prefix.to_string());
    bar
}

/// Runs the model over the images at `indices`, `batch` at a time, and calls `on_batch` with
/// each batch's image indices and scaled coefficients per block. Images that cannot be read are
/// reported on stderr, skipped, and returned.
fn run_model(
    setup: &Setup,
    batch: usize,
    indices: Vec<usize>,
    bar: &ProgressBar,
    mut on_batch: impl FnMut(&[usize], &[ScaledCoefficients]) -> Result<()>,
) -> Result<Vec<SkippedImage>> {
    let size = setup.model.config.vision.image_size;
    let mut decoder = images::Decoder::start(&setup.root, &setup.paths, indices, size, 2 * batch);
    let mut skipped = Vec::new();
    let mut pending: Vec<usize> = Vec::with_capacity(batch);
    let mut pixels: Vec<f32> = Vec::new();
    loop {
        let next = decoder.next()?;
        let finished = next.is_none();
        if let Some(decoded) = next {
            match decoded.pixels {
                Ok(values) => {
                    pending.push(decoded.index);
                    pixels.extend(values);
                }
                Err(error) => {
                    let path = setup.paths[decoded.index].clone();
                    bar.suspend(|| eprintln!("skipping {path}: {error}"));
                    skipped.push(SkippedImage { index: decoded.index, path, error });
                    bar.inc(1);
                }
            }
        }
        if pending.len() == batch || (finished && !pending.is_empty()) {
            let coefficients = lens_coefficients(setup, std::mem::take(&mut pixels), pending.len())?;
            on_batch(&pending, &coefficients)?;
            bar.inc(pending.len() as u64);
            pending.clear();
        }
        if finished {
            return Ok(skipped);
        }
    }
}

/// Forward pass with the lens recording and every block's scaled coefficients, on the host.
pub fn lens_coefficients(setup: &Setup, pixels: Vec<f32>, count: usize) -> Result<Vec<ScaledCoefficients>> {
    coefficients_for(&setup.model, &setup.lens, &setup.shapes, pixels, count)
}

fn coefficients_for(
    model: &ClipModel,
    lens: &Lens,
    shapes: &[BlockShape],
    pixels: Vec<f32>,
    count: usize,
) -> Result<Vec<ScaledCoefficients>> {
    let input = model.vision.input_tensor(pixels, count)?;
    let layers: Vec<usize> = shapes.iter().map(|s| s.layer).collect();
    let output = model.vision.forward(input, &RecordOptions::lens(&layers));
    let recording = output.recording.as_ref().expect("lens recording was requested");
    shapes
        .iter()
        .map(|&shape| {
            let coefficients = lens.coefficients(&output.embedding, recording, shape.layer)?;
            Ok(pollster::block_on(ScaledCoefficients::read(&coefficients, shape))?)
        })
        .collect()
}

/// Pass 1 over one shard: the sums for the means, and the coefficient cache when `cache` is set.
fn pass_one(
    setup: &Setup,
    batch: usize,
    shard: Shard,
    cache: Option<&Path>,
    timings: &mut Timings,
) -> Result<MeansState> {
    let started = Instant::now();
    let mut state = MeansState::new(setup.source.clone(), shard, &setup.shapes)?;

    let indices: Vec<usize> = shard.images(setup.paths.len()).collect();
    let count = indices.len();
    let mut writer = match cache {
        Some(path) => {
            let megabytes = cache::record_bytes(&setup.shapes) as f64 * count as f64 / 1e6;
            eprintln!("caching the lens coefficients for pass 2 in {} (up to {megabytes:.1} MB)", path.display());
            Some(CacheWriter::create(path, &setup.cache_header(shard))?)
        }
        None => None,
    };

    let bar = progress_bar(count, "pass 1/2", "images");
    let skipped = run_model(setup, batch, indices, &bar, |images, coefficients| {
        state.add(images, coefficients)?;
        if let Some(writer) = writer.as_mut() {
            writer.write(images, coefficients)?;
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    if let Some(writer) = writer {
        writer.finish()?;
    }
    let skipped_count = skipped.len();
    for image in skipped {
        state.skip(image);
    }
    log_pass("pass 1 (means)", count, skipped_count, started);
    timings.record("pass 1", started);
    Ok(state)
}

/// Pass 2 over one shard: norm sums and top images, reading the coefficients from `cache` when
/// it is set and running the model otherwise. `skipped` are the shard's unreadable images
/// found by pass 1, recorded as they are when the cache is read.
#[allow(clippy::too_many_arguments)]
fn pass_two(
    setup: &Setup,
    batch: usize,
    k: usize,
    shard: Shard,
    means: Vec<BlockMeans>,
    cache: Option<&Path>,
    skipped: Vec<SkippedImage>,
    timings: &mut Timings,
) -> Result<TopState> {
    let started = Instant::now();
    let mut state = TopState::new(setup.source.clone(), shard, k, means)?;
    let indices: Vec<usize> = shard.images(setup.paths.len()).collect();
    let count = indices.len();
    let bar = progress_bar(count, "pass 2/2", "images");
    let lens = &setup.lens;
    match cache {
        Some(path) => {
            if !path.is_file() {
                bail!(
                    "the coefficient cache {} does not exist; run --stage means with the same \
                     --cache first, or leave out --cache to run the model again",
                    path.display()
                );
            }
            let mut reader = CacheReader::open(path, &setup.cache_header(shard), &setup.shapes)?;
            bar.inc(skipped.len() as u64);
            while let Some((images, coefficients)) = reader.read_batch(batch)? {
                pollster::block_on(state.add(lens, &images, &coefficients))?;
                bar.inc(images.len() as u64);
            }
            for image in skipped {
                state.skip(image);
            }
        }
        None => {
            let skipped = run_model(setup, batch, indices, &bar, |images, coefficients| {
                Ok(pollster::block_on(state.add(lens, images, coefficients))?)
            })?;
            for image in skipped {
                state.skip(image);
            }
        }
    }
    bar.finish_and_clear();
    log_pass("pass 2 (top images)", count, state.coverage.skipped.len(), started);
    timings.record("pass 2", started);
    Ok(state)
}

/// Logs a pass over `files` image files, of which `skipped` could not be read.
fn log_pass(pass: &str, files: usize, skipped: usize, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    let images = files - skipped;
    eprintln!(
        "{pass}: {images} images in {seconds:.1} s ({:.1} images/s), {skipped} of {files} files skipped",
        images as f64 / seconds.max(1e-9)
    );
}

fn read_partial(path: &Path) -> Result<Partial> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the partial file {}", path.display()))?;
    Ok(Partial::decode(&bytes, &path.display().to_string())?)
}

fn write_partial(path: &Path, partial: &Partial) -> Result<()> {
    std::fs::write(path, partial.encode()).with_context(|| format!("cannot write {}", path.display()))
}

/// `clip-lens atlas-merge`: merges partial files of one stage into one.
pub fn merge(args: MergeArgs) -> Result<()> {
    let mut merged: Option<Partial> = None;
    for path in &args.partials {
        let partial = read_partial(path)?;
        match &mut merged {
            None => merged = Some(partial),
            Some(merged) => merged.merge(partial).with_context(|| format!("merging {}", path.display()))?,
        }
    }
    let merged = merged.expect("clap requires at least one partial file");
    write_partial(&args.out, &merged)?;
    let coverage = merged.coverage();
    let missing = coverage.shard_count - coverage.shards.len();
    let status = if missing == 0 {
        "all shards".to_string()
    } else {
        format!("{} of {} shards ({missing} still missing)", coverage.shards.len(), coverage.shard_count)
    };
    println!(
        "merged {} {} partial files ({status}, {} images used, {} skipped) into {}",
        args.partials.len(),
        merged.kind(),
        coverage.images,
        coverage.skipped.len(),
        args.out.display()
    );
    Ok(())
}

//! Finishing an atlas: principal directions from the merged statistics, class alignment, text
//! terms, and the atlas directory with its manifest.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use engine::assets::{
    encode_f16, encode_f32, encode_lines, encode_u16, encode_u32, BlockInfo, BuildInfo, ClassesInfo, Dtype, FileEntry,
    ImagesInfo, Manifest, ModelInfo, SkippedFile, VocabularyInfo, MANIFEST,
};
use engine::atlas::{class_alignment, class_embeddings, term_arrays, BlockStatistics, TopState};
use engine::decompose::{omp_batch, Dictionary};
use engine::tokenizer::ClipTokenizer;
use engine::Activation;

use super::{progress_bar, AtlasArgs, Setup, Timings, TEMPORARY_CACHE};

/// The built-in text pool and classes, from the repository's assets/ folder.
const BUILT_IN_VOCABULARY: &[u8] = include_bytes!("../../../assets/vocabulary.txt");
const BUILT_IN_CLASSES: &[u8] = include_bytes!("../../../assets/imagenet.json");

/// Texts embedded per call of the text tower, so that the progress bar moves.
const TEXTS_PER_CALL: usize = 1024;

/// Makes `dir` ready for a new atlas: creates it, or empties an existing atlas there (the files
/// its manifest lists). Any other non-empty directory is rejected, so that no unrelated file is
/// overwritten. Returns whether it created `dir`.
pub fn prepare_directory(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        return Ok(true);
    }
    if !dir.is_dir() {
        bail!("{} exists and is not a directory; --out needs a directory for the atlas", dir.display());
    }
    let manifest_path = dir.join(MANIFEST);
    if manifest_path.is_file() {
        let json = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("cannot read {}", manifest_path.display()))?;
        let manifest = Manifest::parse(&json).with_context(|| {
            format!("{} holds a manifest this version cannot read; remove the directory first", dir.display())
        })?;
        for file in &manifest.files {
            let path = dir.join(&file.path);
            if path.is_file() {
                std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
        for block in &manifest.blocks {
            // Removes the block folder only when nothing else is left in it.
            let _ = std::fs::remove_dir(dir.join(format!("block{}", block.layer)));
        }
        std::fs::remove_file(&manifest_path).with_context(|| format!("cannot remove {}", manifest_path.display()))?;
        return Ok(false);
    }
    let mut entries = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if entries.any(|e| e.map_or(true, |e| e.file_name() != TEMPORARY_CACHE)) {
        bail!("{} is not empty and contains no atlas; choose a new or empty directory for --out", dir.display());
    }
    Ok(false)
}

/// Classes and templates for the class embeddings.
struct ClassSet {
    source: String,
    names: Vec<String>,
    /// Prompts per class: the templates filled with its name.
    prompts: Vec<Vec<String>>,
    templates: usize,
}

/// The classes and the text pool of an atlas, read and checked before the passes over the images.
pub struct TextInputs {
    classes: ClassSet,
    vocabulary: Vec<String>,
    vocabulary_source: String,
}

impl TextInputs {
    /// Reads `--classes` and `--vocabulary` (or the built-in files) and checks them against
    /// `--templates` and `--terms`.
    pub fn read(args: &AtlasArgs) -> Result<TextInputs> {
        let classes = read_classes(args)?;
        let (vocabulary, vocabulary_source) = read_vocabulary(args)?;
        if vocabulary.len() < args.terms {
            bail!(
                "{vocabulary_source} has {} texts, fewer than --terms {}; lower --terms or use a larger vocabulary",
                vocabulary.len(),
                args.terms
            );
        }
        Ok(TextInputs { classes, vocabulary, vocabulary_source })
    }
}

fn read_classes(args: &AtlasArgs) -> Result<ClassSet> {
    let (bytes, source) = match &args.classes {
        Some(path) => (
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (BUILT_IN_CLASSES.to_vec(), "built-in assets/imagenet.json".to_string()),
    };
    let classes = engine::vocabulary::ImageNet::from_json(&bytes).with_context(|| format!("in {source}"))?;
    let available = classes.templates.len();
    let templates = args.templates.unwrap_or(available);
    if templates > available {
        bail!("--templates {templates}: {source} has only {available} templates");
    }
    warn_duplicates(&classes.classes, ("class name", "class names"), &source);
    let prompts = classes.classes.iter().map(|name| classes.prompts(name).into_iter().take(templates).collect()).collect();
    Ok(ClassSet { source, names: classes.classes.clone(), prompts, templates })
}

fn read_vocabulary(args: &AtlasArgs) -> Result<(Vec<String>, String)> {
    let (bytes, source) = match &args.vocabulary {
        Some(path) => (
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (BUILT_IN_VOCABULARY.to_vec(), "built-in assets/vocabulary.txt".to_string()),
    };
    let texts = engine::vocabulary::read_text_pool(&bytes).with_context(|| format!("in {source}"))?;
    // Lines are split at `\n`, so only a lone `\r` can be left inside a text.
    if let Some(index) = texts.iter().position(|t| t.contains(['\n', '\r'])) {
        bail!("{source}: text {index} contains a line break, which vocabulary.txt cannot store");
    }
    warn_duplicates(&texts, ("text", "texts"), &source);
    Ok((texts, source))
}

/// Warns on stderr when `texts` repeat, naming the number of repeats and the first repeated
/// text. The repeats are kept, so the atlas lists them as often as the input does.
fn warn_duplicates(texts: &[String], (singular, plural): (&str, &str), source: &str) {
    let mut seen = std::collections::HashSet::new();
    let mut first = None;
    let mut repeats = 0;
    for text in texts {
        if !seen.insert(text.as_str()) {
            repeats += 1;
            first.get_or_insert(text.as_str());
        }
    }
    if let Some(first) = first {
        let noun = if repeats == 1 { singular } else { plural };
        eprintln!("warning: {source} contains {repeats} duplicate {noun}, the first is {first:?}");
    }
}

/// Computes directions, classes and terms from the merged top state and writes the atlas.
pub fn write_atlas(
    setup: &Setup,
    args: &AtlasArgs,
    texts: TextInputs,
    top: &TopState,
    timings: &mut Timings,
    command_started: Instant,
) -> Result<()> {
    let d = setup.lens.embed_dim();
    let neurons = setup.lens.neurons();

    let started = Instant::now();
    let bar = progress_bar(neurons * setup.shapes.len(), "directions", "neurons");
    let statistics = pollster::block_on(top.finish(&setup.lens, &|done| bar.set_position(done as u64)))?;
    bar.finish_and_clear();
    timings.record("directions", started);

    // Everything text-side: the tower, the tokenizer, the classes and the vocabulary.
    let started = Instant::now();
    let TextInputs { classes, vocabulary, vocabulary_source } = texts;
    let config = &setup.model.config;
    let tokenizer = crate::text::load_tokenizer(&setup.model_dir, config)?;
    let tower = engine::text::load_text_from_dir(&setup.model_dir, &setup.device)?;
    let bar = progress_bar(classes.names.len(), "classes", "classes");
    let class_tensor = class_embeddings(&tower, &tokenizer, &classes.prompts, &|done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let mut alignments = Vec::new();
    for block in &statistics {
        alignments.push(pollster::block_on(class_alignment(&block.direction, &class_tensor))?);
    }
    timings.record("classes", started);

    let started = Instant::now();
    let embeddings = embed_vocabulary(&tower, &tokenizer, &vocabulary)?;
    timings.record("vocabulary", started);

    let started = Instant::now();
    let dictionary = Dictionary::authors(&embeddings, vocabulary.len(), d)?;
    let targets: Vec<f32> = statistics.iter().flat_map(|b| b.direction.iter().copied()).collect();
    let count = statistics.len() * neurons;
    let bar = progress_bar(count, "terms", "neurons");
    let results = omp_batch(&dictionary, &targets, count, args.terms, &|done| bar.set_position(done as u64));
    bar.finish_and_clear();
    timings.record("terms", started);

    let mut writer = Writer::new(&args.out);
    writer.text("images.txt", &setup.paths)?;
    writer.text("classes.txt", &classes.names)?;
    writer.text("vocabulary.txt", &vocabulary)?;
    writer.tensor("vocabulary_embeddings.bin", Dtype::F16, vec![vocabulary.len(), d], encode_f16(&embeddings))?;
    for (i, block) in statistics.iter().enumerate() {
        let results = &results[i * neurons..(i + 1) * neurons];
        let (terms, weights) = term_arrays(results, args.terms)?;
        let (class_indices, class_values, kept) = &alignments[i];
        let alignment = (class_indices.as_slice(), class_values.as_slice(), *kept);
        write_block(&mut writer, block, args.terms, (terms.as_slice(), weights.as_slice()), alignment)?;
    }

    let skipped: Vec<SkippedFile> = top
        .coverage
        .skipped
        .iter()
        .map(|s| SkippedFile { path: s.path.clone(), error: s.error.clone() })
        .collect();
    let manifest = Manifest {
        format: engine::assets::FORMAT.into(),
        version: engine::assets::VERSION,
        model: model_info(setup),
        blocks: statistics.iter().map(|b| BlockInfo { layer: b.shape.layer, pairs: b.shape.pairs }).collect(),
        k: top.k,
        m: args.terms,
        images: ImagesInfo {
            file: "images.txt".into(),
            listed: setup.paths.len(),
            used: top.coverage.images as usize,
            skipped,
        },
        vocabulary: VocabularyInfo { file: "vocabulary.txt".into(), source: vocabulary_source, count: vocabulary.len() },
        classes: ClassesInfo {
            file: "classes.txt".into(),
            source: classes.source.clone(),
            count: classes.names.len(),
            templates: classes.templates,
        },
        build: BuildInfo {
            command: std::env::args().collect(),
            version: env!("CARGO_PKG_VERSION").into(),
            device: setup.device_name.clone(),
            date: rfc3339_now(),
            seconds: command_started.elapsed().as_secs_f64(),
            shards: top.coverage.shard_count,
        },
        files: writer.files,
    };
    let manifest_path = args.out.join(MANIFEST);
    std::fs::write(&manifest_path, manifest.to_json())
        .with_context(|| format!("cannot write {}", manifest_path.display()))?;

    print_summary(&manifest, &statistics, &args.out);
    Ok(())
}

fn embed_vocabulary(
    tower: &engine::text::TextTransformer,
    tokenizer: &ClipTokenizer,
    vocabulary: &[String],
) -> Result<Vec<f32>> {
    let bar = progress_bar(vocabulary.len(), "vocabulary", "texts");
    let mut embeddings = Vec::with_capacity(vocabulary.len() * tower.embed_dim());
    for chunk in vocabulary.chunks(TEXTS_PER_CALL) {
        let embedded = tower.embed_texts_normalized(tokenizer, chunk)?;
        embeddings.extend(crate::host(embedded)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(embeddings)
}

fn model_info(setup: &Setup) -> ModelInfo {
    let config = &setup.model.config;
    let vision = &config.vision;
    let name = std::fs::canonicalize(&setup.model_dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| setup.model_dir.display().to_string());
    ModelInfo {
        name,
        layers: vision.layers,
        width: vision.width,
        heads: vision.heads,
        neurons: vision.mlp_dim,
        embed_dim: config.embed_dim,
        image_size: vision.image_size,
        patch_size: vision.patch_size,
        activation: match config.activation {
            Activation::QuickGelu => "quick_gelu".into(),
            Activation::Gelu => "gelu".into(),
        },
        weights_sha256: setup.source.weights_sha256.clone(),
    }
}

fn write_block(
    writer: &mut Writer,
    block: &BlockStatistics,
    m: usize,
    (terms, weights): (&[u32], &[f32]),
    (classes, alignment, kept): (&[u16], &[f32], usize),
) -> Result<()> {
    let layer = block.shape.layer;
    let (n, d, k, pairs) = (block.shape.neurons, block.shape.embed_dim, block.k, block.shape.pairs);
    let path = |name: &str| Manifest::block_file(layer, name);
    writer.tensor(&path("mean_coefficients"), Dtype::F32, vec![pairs, n], encode_f32(&block.mean_coefficients))?;
    writer.tensor(&path("mean_shared"), Dtype::F32, vec![d], encode_f32(&block.mean_shared))?;
    writer.tensor(&path("threshold"), Dtype::F32, vec![n], encode_f32(&block.threshold))?;
    writer.tensor(&path("direction"), Dtype::F16, vec![n, d], encode_f16(&block.direction))?;
    writer.tensor(&path("explained"), Dtype::F32, vec![n], encode_f32(&block.explained))?;
    writer.tensor(&path("selectivity"), Dtype::F32, vec![n], encode_f32(&block.selectivity))?;
    writer.tensor(&path("top_images"), Dtype::U32, vec![n, k], encode_u32(&block.top_images))?;
    writer.tensor(&path("top_norms"), Dtype::F32, vec![n, k], encode_f32(&block.top_norms))?;
    writer.tensor(&path("terms"), Dtype::U32, vec![n, m], encode_u32(terms))?;
    writer.tensor(&path("term_weights"), Dtype::F32, vec![n, m], encode_f32(weights))?;
    writer.tensor(&path("classes"), Dtype::U16, vec![n, kept], encode_u16(classes))?;
    writer.tensor(&path("class_alignment"), Dtype::F32, vec![n, kept], encode_f32(alignment))?;
    Ok(())
}

/// Writes files into the atlas directory and records their manifest entries.
struct Writer<'a> {
    dir: &'a Path,
    files: Vec<FileEntry>,
}

impl<'a> Writer<'a> {
    fn new(dir: &'a Path) -> Self {
        Writer { dir, files: Vec::new() }
    }

    fn tensor(&mut self, path: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Result<()> {
        debug_assert_eq!(bytes.len(), shape.iter().product::<usize>() * dtype.size(), "{path}");
        let full = self.dir.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&full, &bytes).with_context(|| format!("cannot write {}", full.display()))?;
        self.files.push(FileEntry::describe(path, dtype, shape, &bytes));
        Ok(())
    }

    fn text(&mut self, path: &str, lines: &[String]) -> Result<()> {
        let bytes = encode_lines(lines);
        self.tensor(path, Dtype::Text, vec![lines.len()], bytes)
    }
}

fn print_summary(manifest: &Manifest, statistics: &[BlockStatistics], out: &Path) {
    let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
    println!(
        "wrote the atlas to {}: blocks {:?} of {} neurons, k = {}, m = {}, {} files, {:.1} MB",
        out.display(),
        manifest.layers(),
        manifest.model.neurons,
        manifest.k,
        manifest.m,
        manifest.files.len() + 1,
        bytes as f64 / 1e6
    );
    println!(
        "images: {} used, {} skipped, {} listed",
        manifest.images.used,
        manifest.images.skipped.len(),
        manifest.images.listed
    );
    for block in statistics {
        println!(
            "block {}: median explained share {:.3}, median selectivity {:.2}, median threshold {:.4}",
            block.shape.layer,
            median(&block.explained),
            median(&block.selectivity),
            median(&block.threshold)
        );
    }
}

fn median(values: &[f32]) -> f32 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f32::NAN)
}

/// Formats the current UTC time as RFC 3339, to the second.
fn rfc3339_now() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = ((seconds / 86_400) as i64, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

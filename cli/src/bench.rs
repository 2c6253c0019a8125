//! `clip-lens bench`: per-image forward-pass and lens time on one device.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use engine::lens::{default_layers, Lens};
use engine::model::RecordOptions;
use engine::random::{generate, StorageType};
use engine::weights::{load_clip, Naming};
use engine::{ClipConfig, Tensor, TensorData};

use crate::{host, load_model, DeviceArgs};

#[derive(Args)]
pub struct BenchArgs {
    /// Model directory to measure.
    #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
    model: Option<std::path::PathBuf>,
    /// Shape preset measured with seeded random weights instead of a model directory.
    #[arg(long)]
    preset: Option<String>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed repetitions after one warm-up pass.
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also measure atlas throughput: images per second of `clip-lens atlas` pass 1 plus pass 2
    /// (coefficient cache on) over batch x iterations random images, against the forward pass.
    #[arg(long)]
    atlas: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.batch == 0 || args.iterations == 0 {
        bail!("--batch and --iterations must be at least 1");
    }
    let device = args.device.init()?;
    let model = match (&args.model, &args.preset) {
        (Some(dir), _) => load_model(dir, &device)?,
        (None, Some(preset)) => {
            let config = ClipConfig::preset(preset)?;
            let generated = generate(&config, 0, Naming::OpenAi, StorageType::F32)?;
            load_clip(&generated.config_json, &generated.safetensors, preset, &device)?
        }
        (None, None) => bail!("give --model DIR or --preset NAME"),
    };
    let config = &model.config.vision;
    let layers = default_layers(config.layers);
    if layers.is_empty() {
        bail!("a {}-block model has no block with a later block to measure", config.layers);
    }

    let started = Instant::now();
    let lens = Lens::new(&model.vision, &layers)?;
    // Force the basis to be computed before timing anything else.
    let probe = model.vision.forward(random_input(&model, args.batch), &RecordOptions::lens(&layers));
    for &layer in &layers {
        let c = lens.coefficients(&probe.embedding, probe.recording.as_ref().unwrap(), layer)?;
        host(lens.effect_norms(&c)?)?;
    }
    let basis_ms = started.elapsed().as_secs_f64() * 1e3;

    let mut forward_ms = Vec::new();
    let mut recorded_ms = Vec::new();
    let mut lens_ms = Vec::new();
    for _ in 0..args.iterations {
        let input = random_input(&model, args.batch);
        let start = Instant::now();
        let output = model.vision.forward(input.clone(), &RecordOptions::default());
        host(output.embedding)?;
        forward_ms.push(start.elapsed().as_secs_f64() * 1e3);

        let start = Instant::now();
        let output = model.vision.forward(input, &RecordOptions::lens(&layers));
        let recording = output.recording.as_ref().expect("lens recording was requested");
        // Reading the embedding waits for the whole pass, recording included, so the lens
        // timing below excludes it.
        host(output.embedding.clone())?;
        recorded_ms.push(start.elapsed().as_secs_f64() * 1e3);

        let start = Instant::now();
        let mut norms = Vec::new();
        for &layer in &layers {
            let c = lens.coefficients(&output.embedding, recording, layer)?;
            norms.push(lens.effect_norms(&c)?);
        }
        for n in norms {
            host(n)?;
        }
        lens_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }

    let per_image = |v: &[f64]| median(v) / args.batch as f64;
    let forward = per_image(&forward_ms);
    let lens_time = per_image(&lens_ms);
    let atlas = if args.atlas {
        Some(crate::atlas::throughput::measure(&model, &layers, args.batch, args.iterations)?)
    } else {
        None
    };

    if args.json {
        let mut value = serde_json::json!({
            "forward_ms_per_image": forward,
            "lens_ms_per_image": lens_time,
            "lens_over_forward": lens_time / forward,
            "basis_ms": basis_ms,
            "layers": layers,
            "batch": args.batch,
            "iterations": args.iterations,
        });
        if let Some(atlas) = &atlas {
            value["atlas"] = serde_json::json!({
                "images": atlas.images,
                "forward_images_per_second": atlas.forward,
                "pass_one_images_per_second": atlas.pass_one,
                "pass_two_images_per_second": atlas.pass_two,
                "atlas_images_per_second": atlas.atlas,
                "atlas_over_forward": atlas.atlas / atlas.forward,
                "k": atlas.k,
                "finish_seconds": atlas.finish_seconds,
            });
        }
        println!("{value}");
    } else {
        println!("blocks {layers:?}, batch {}, median of {} runs", args.batch, args.iterations);
        println!("forward pass      {forward:>10.2} ms per image");
        println!("lens ({} blocks)   {lens_time:>10.2} ms per image ({:.1}% of the forward pass)", layers.len(), 100.0 * lens_time / forward);
        println!("basis (once)      {basis_ms:>10.2} ms");
        if let Some(atlas) = &atlas {
            println!("atlas throughput over {} random images (k = {}):", atlas.images, atlas.k);
            println!("  forward pass only {:>10.2} images/s", atlas.forward);
            println!("  atlas pass 1      {:>10.2} images/s", atlas.pass_one);
            println!("  atlas pass 2      {:>10.2} images/s", atlas.pass_two);
            println!("  passes 1 + 2      {:>10.2} images/s ({:.2} of the forward rate)", atlas.atlas, atlas.atlas / atlas.forward);
            println!("  directions (once) {:>10.2} s", atlas.finish_seconds);
        }
    }
    Ok(())
}

fn random_input(model: &engine::model::ClipModel, batch: usize) -> Tensor<4> {
    let size = model.config.vision.image_size;
    let mut rng = engine::random::Rng::new(batch as u64);
    let values = rng.normal_vec(batch * 3 * size * size, 0.0, 1.0);
    Tensor::from_data(TensorData::new(values, [batch, 3, size, size]), &model.vision.device())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    sorted[sorted.len() / 2]
}

//! Atlas throughput for `clip-lens bench --atlas`: images per second of pass 1 plus pass 2
//! against the plain forward pass, on random inputs so that image decoding is left out of both.

use std::time::Instant;

use anyhow::Result;
use engine::atlas::{BlockShape, MeansState, Shard, StatisticsSource, TopState, DEFAULT_TOP_IMAGES};
use engine::lens::Lens;
use engine::model::{ClipModel, RecordOptions};

use super::cache::{CacheReader, CacheWriter};
use super::coefficients_for;

/// Measured rates, in images per second, and the one-off finishing time.
pub struct Throughput {
    pub images: usize,
    pub forward: f64,
    pub pass_one: f64,
    pub pass_two: f64,
    /// Pass 1 and pass 2 together: images / (time of pass 1 + time of pass 2).
    pub atlas: f64,
    /// Top images kept per neuron in the measurement (at most the image count).
    pub k: usize,
    /// Directions of every neuron, once per atlas.
    pub finish_seconds: f64,
}

/// Runs `batches` batches of `batch` random images through the forward pass alone and through
/// pass 1 (writing the coefficient cache, as `clip-lens atlas` does by default), then through
/// pass 2 (reading the cache back), and times each.
pub fn measure(model: &ClipModel, layers: &[usize], batch: usize, batches: usize) -> Result<Throughput> {
    let lens = Lens::new(&model.vision, layers)?;
    let shapes = BlockShape::of_lens(&lens)?;
    let images = batch * batches;
    let size = model.config.vision.image_size;
    let mut rng = engine::random::Rng::new(17);
    let inputs: Vec<Vec<f32>> = (0..batches).map(|_| rng.normal_vec(batch * 3 * size * size, 0.0, 1.0)).collect();
    let source = StatisticsSource {
        weights_sha256: String::new(),
        images_sha256: String::new(),
        images_listed: images,
        layers: layers.to_vec(),
    };

    // Warm-up: builds the basis's lazy tensors and the backend's kernels outside the timings.
    let warm = coefficients_for(model, &lens, &shapes, inputs[0].clone(), batch)?;
    drop(warm);

    // The forward pass alone and pass 1 alternate batch by batch, so that both see the same load
    // from other processes on a shared machine.
    let cache = std::env::temp_dir().join(format!("clip-lens-bench-{}.cache", std::process::id()));
    let header = serde_json::json!({ "bench": true });
    let mut means = MeansState::new(source.clone(), Shard::WHOLE, &shapes)?;
    let mut writer = CacheWriter::create(&cache, &header)?;
    let (mut forward, mut pass_one) = (0.0, 0.0);
    for (b, pixels) in inputs.iter().enumerate() {
        let started = Instant::now();
        let input = model.vision.input_tensor(pixels.clone(), batch)?;
        let output = model.vision.forward(input, &RecordOptions::default());
        crate::host(output.embedding)?;
        forward += started.elapsed().as_secs_f64();

        let started = Instant::now();
        let indices: Vec<usize> = (b * batch..(b + 1) * batch).collect();
        let coefficients = coefficients_for(model, &lens, &shapes, pixels.clone(), batch)?;
        means.add(&indices, &coefficients)?;
        writer.write(&indices, &coefficients)?;
        pass_one += started.elapsed().as_secs_f64();
    }
    let started = Instant::now();
    writer.finish()?;
    pass_one += started.elapsed().as_secs_f64();

    let started = Instant::now();
    let k = DEFAULT_TOP_IMAGES.min(images);
    let mut top = TopState::new(source, Shard::WHOLE, k, means.means()?)?;
    let mut reader = CacheReader::open(&cache, &header, &shapes)?;
    while let Some((indices, coefficients)) = reader.read_batch(batch)? {
        pollster::block_on(top.add(&lens, &indices, &coefficients))?;
    }
    let pass_two = started.elapsed().as_secs_f64();
    drop(reader);
    let _ = std::fs::remove_file(&cache);

    let started = Instant::now();
    pollster::block_on(top.finish(&lens, &|_| {}))?;
    let finish_seconds = started.elapsed().as_secs_f64();

    let rate = |seconds: f64| images as f64 / seconds;
    Ok(Throughput {
        images,
        forward: rate(forward),
        pass_one: rate(pass_one),
        pass_two: rate(pass_two),
        atlas: rate(pass_one + pass_two),
        k,
        finish_seconds,
    })
}

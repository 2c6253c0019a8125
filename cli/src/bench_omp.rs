//! `clip-lens bench-omp`: time of the sparse text decomposition (dictionary and batched OMP) on a
//! seeded random pool of unit embeddings and random unit targets.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use engine::decompose::{omp, omp_batch_with, Dictionary, OmpOptions};
use engine::random::Rng;

#[derive(Args)]
pub struct BenchOmpArgs {
    /// Texts in the pool (atoms of the dictionary).
    #[arg(long, default_value_t = 30_000)]
    texts: usize,
    /// Embedding dimension.
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// Targets of a whole atlas, for the extrapolated time (3 blocks × 3,072 neurons of ViT-B).
    #[arg(long, default_value_t = 9_216)]
    atlas_targets: usize,
    /// Targets actually decomposed; the time is extrapolated linearly to --atlas-targets.
    /// Defaults to --atlas-targets.
    #[arg(long)]
    targets: Option<usize>,
    /// Atoms per decomposition (m).
    #[arg(long, default_value_t = 32)]
    atoms: usize,
    /// Memory for cached Gram columns, in MiB.
    #[arg(long, default_value_t = OmpOptions::default().gram_cache_bytes >> 20)]
    cache_mib: usize,
    /// Steps of each pursuit that use cached Gram columns before switching to residual products;
    /// the engine's default (dim / 16) if not given.
    #[arg(long)]
    gram_steps: Option<usize>,
    /// Targets also decomposed one at a time by `omp` (no Gram columns) to compare time and
    /// selected atoms.
    #[arg(long, default_value_t = 4)]
    single: usize,
    /// Seed of the random pool and targets.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: BenchOmpArgs) -> Result<()> {
    let targets = args.targets.unwrap_or(args.atlas_targets);
    if args.texts < 2 || args.dim == 0 || targets == 0 || args.atoms == 0 {
        bail!("--texts must be at least 2, and --dim, --targets and --atoms at least 1");
    }
    if args.single > targets {
        bail!("--single {} exceeds --targets {targets}", args.single);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let options = OmpOptions {
        gram_cache_bytes: args.cache_mib << 20,
        gram_steps: args.gram_steps,
    };
    println!(
        "pool {} texts × {} dims, m = {}, {targets} of {} atlas targets, {threads} threads, \
         Gram cache {} MiB, {} Gram steps, seed {}",
        args.texts,
        args.dim,
        args.atoms,
        args.atlas_targets,
        args.cache_mib,
        options.gram_steps_for(args.dim),
        args.seed
    );

    let mut rng = Rng::new(args.seed);
    let pool = random_unit_rows(&mut rng, args.texts, args.dim);
    let directions = random_unit_rows(&mut rng, targets, args.dim);

    let start = Instant::now();
    let dictionary = Dictionary::authors(&pool, args.texts, args.dim)?;
    println!("dictionary (authors'): {:.0} ms", elapsed_ms(start));

    let start = Instant::now();
    let batch = omp_batch_with(
        &dictionary,
        &directions,
        targets,
        args.atoms,
        &options,
        &|done| {
            eprint!("\r{done} / {targets} targets");
        },
    );
    eprintln!();
    let batch_ms = elapsed_ms(start);
    let per_target = batch_ms / targets as f64;
    println!("omp_batch: {batch_ms:.0} ms for {targets} targets, {per_target:.2} ms per target");
    println!(
        "extrapolated to {} targets: {:.1} s",
        args.atlas_targets,
        per_target * args.atlas_targets as f64 / 1e3
    );

    if args.single > 0 {
        let start = Instant::now();
        let singles: Vec<_> = directions
            .chunks_exact(args.dim)
            .take(args.single)
            .map(|target| omp(&dictionary, target, args.atoms))
            .collect();
        let single_ms = elapsed_ms(start) / args.single as f64;
        let agreeing = singles
            .iter()
            .zip(&batch)
            .filter(|(single, batched)| same_atoms(single, batched))
            .count();
        println!(
            "omp, one target at a time: {single_ms:.2} ms per target; same atoms as omp_batch for \
             {agreeing} of {} targets",
            args.single
        );
    }
    Ok(())
}

fn random_unit_rows(rng: &mut Rng, rows: usize, dim: usize) -> Vec<f32> {
    let mut values = rng.normal_vec(rows * dim, 0.0, 1.0);
    for row in values.chunks_exact_mut(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
    values
}

fn same_atoms(a: &[(usize, f64)], b: &[(usize, f64)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0)
}

fn elapsed_ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

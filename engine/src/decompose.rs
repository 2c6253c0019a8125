//! Sparse text decomposition: a dictionary built from the text embeddings of a pool of
//! descriptions, and orthogonal matching pursuit (OMP), which writes a direction of the joint
//! embedding space as a signed combination of m of those texts.
//!
//! `omp` reproduces scikit-learn 1.9's `OrthogonalMatchingPursuit(n_nonzero_coefs=m,
//! fit_intercept=False).fit(X=atoms.T, y=target)`. With more texts than dimensions scikit-learn
//! runs its Cholesky variant (`_cholesky_omp` in `sklearn/linear_model/_omp.py`), whose selection
//! and stopping rules are kept here, including their quirks (see `Pursuit`). `omp_batch` runs the
//! same pursuit for many targets in the Gram formulation, which scikit-learn's `_gram_omp` also
//! uses, with a bounded cache of Gram columns shared across targets.

#[cfg(not(target_arch = "wasm32"))]
use rayon::prelude::*;

use crate::error::{EngineError, Result};

/// Scale of the authors' dictionary: embeddings are multiplied by 100, and every dimension is
/// scaled to norm 100 over the pool.
const AUTHORS_SCALE: f64 = 100.0;

/// Allowed deviation of an input embedding's norm from 1.
const UNIT_NORM_TOLERANCE: f64 = 1e-3;

/// scikit-learn's threshold for a vanishing correlation or pivot: `np.finfo(float64).eps`.
const EPSILON: f64 = f64::EPSILON;

/// Unit roundoff of f32: the largest relative error of rounding an f64 Gram entry to f32.
const F32_ROUNDING: f64 = 1.0 / (1u64 << 24) as f64;

/// Rows of the correlation vector computed at once in `omp_batch`. Their 2048 f64 values (16 KiB)
/// stay in the L1 or L2 cache while the selected Gram columns stream past them.
const ROW_BLOCK: usize = 2048;

/// Upper bound on the targets that `omp_batch` advances in lockstep; their correlations with the
/// pool take `chunk × texts × 8` bytes.
const MAX_CHUNK: usize = 512;

/// The atoms of a sparse decomposition: `texts` rows of length `dim`, stored in f64.
#[derive(Clone, Debug)]
pub struct Dictionary {
    atoms: Vec<f64>,
    texts: usize,
    dim: usize,
    squared_norms: Vec<f64>,
    max_norm: f64,
}

impl Dictionary {
    /// Builds the dictionary as Gandelsman, Efros and Steinhardt build it, from unit-normalized
    /// text embeddings `[texts, dim]`: multiply by 100, subtract the pool mean from every row,
    /// then divide every dimension (column) by its norm over the pool and multiply by 100.
    ///
    /// Columns, not rows, are normalized, so the atoms do not have unit norm.
    pub fn authors(embeddings: &[f32], texts: usize, dim: usize) -> Result<Dictionary> {
        let mut atoms = centered_pool(embeddings, texts, dim)?;

        for column in 0..dim {
            let norm = (0..texts)
                .map(|row| atoms[row * dim + column].powi(2))
                .sum::<f64>()
                .sqrt();
            if norm == 0.0 {
                return Err(EngineError::Input(format!(
                    "text embeddings: dimension {column} has the same value for all {texts} texts, \
                     so the authors' dictionary cannot scale it to norm 100; use a pool of \
                     distinct texts or Dictionary::unit_rows"
                )));
            }
            for row in 0..texts {
                let value = &mut atoms[row * dim + column];
                *value = *value / norm * AUTHORS_SCALE;
            }
        }
        Dictionary::from_atoms(atoms, texts, dim)
    }

    /// Builds a dictionary of unit-norm atoms from unit-normalized text embeddings
    /// `[texts, dim]`: subtract the pool mean from every row, then scale every row to unit length.
    ///
    /// This is the normalization OMP assumes (scikit-learn documents unit-norm columns of X),
    /// unlike `authors`, whose atoms have unequal norms.
    pub fn unit_rows(embeddings: &[f32], texts: usize, dim: usize) -> Result<Dictionary> {
        let mut atoms = centered_pool(embeddings, texts, dim)?;

        for (row, atom) in atoms.chunks_exact_mut(dim).enumerate() {
            let norm = atom.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm == 0.0 {
                return Err(EngineError::Input(format!(
                    "text embeddings: text {row} equals the pool mean, so its centered atom is zero \
                     and cannot be scaled to unit length; remove it from the pool"
                )));
            }
            atom.iter_mut().for_each(|v| *v /= norm);
        }
        Dictionary::from_atoms(atoms, texts, dim)
    }

    /// Wraps ready-made atoms `[texts, dim]` (row-major) without changing them.
    pub fn from_atoms(atoms: Vec<f64>, texts: usize, dim: usize) -> Result<Dictionary> {
        check_shape(atoms.len(), texts, dim, "dictionary atoms")?;
        if let Some(index) = atoms.iter().position(|v| !v.is_finite()) {
            return Err(EngineError::Input(format!(
                "dictionary atoms: atom {} has the non-finite value {} at dimension {}",
                index / dim,
                atoms[index],
                index % dim
            )));
        }
        let squared_norms: Vec<f64> = atoms
            .chunks_exact(dim)
            .map(|atom| dot(atom, atom))
            .collect();
        let max_norm = squared_norms.iter().copied().fold(0.0, f64::max).sqrt();
        Ok(Dictionary {
            atoms,
            texts,
            dim,
            squared_norms,
            max_norm,
        })
    }

    /// Returns the number of atoms (texts of the pool).
    pub fn texts(&self) -> usize {
        self.texts
    }

    /// Returns the length of every atom (the embedding dimension).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Returns the atoms, `[texts, dim]` row-major.
    pub fn atoms(&self) -> &[f64] {
        &self.atoms
    }

    /// Returns atom `index`, of length `dim`.
    pub fn atom(&self, index: usize) -> &[f64] {
        &self.atoms[index * self.dim..(index + 1) * self.dim]
    }

    /// Computes the correlation of every atom with `vector` (length `dim`).
    fn correlations(&self, vector: &[f64]) -> Vec<f64> {
        self.atoms
            .chunks_exact(self.dim)
            .map(|atom| dot(atom, vector))
            .collect()
    }
}

/// Checks a pool of unit-normalized embeddings and returns it in f64, multiplied by 100, with the
/// pool mean subtracted from every row.
fn centered_pool(embeddings: &[f32], texts: usize, dim: usize) -> Result<Vec<f64>> {
    check_shape(embeddings.len(), texts, dim, "text embeddings")?;
    if texts < 2 {
        return Err(EngineError::Input(format!(
            "text embeddings: a dictionary needs at least 2 texts because it subtracts the pool \
             mean, but the pool has {texts}"
        )));
    }
    for (row, embedding) in embeddings.chunks_exact(dim).enumerate() {
        if let Some(column) = embedding.iter().position(|v| !v.is_finite()) {
            return Err(EngineError::Input(format!(
                "text embeddings: text {row} has the non-finite value {} at dimension {column}",
                embedding[column]
            )));
        }
        let norm = embedding
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        if (norm - 1.0).abs() > UNIT_NORM_TOLERANCE {
            return Err(EngineError::Input(format!(
                "text embeddings: text {row} has norm {norm}; expected unit-normalized embeddings \
                 (as `clip-lens embed-text` writes them)"
            )));
        }
    }

    let mut pool: Vec<f64> = embeddings
        .iter()
        .map(|&v| f64::from(v) * AUTHORS_SCALE)
        .collect();
    let mut mean = vec![0.0; dim];
    for row in pool.chunks_exact(dim) {
        mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
    }
    mean.iter_mut().for_each(|m| *m /= texts as f64);
    for row in pool.chunks_exact_mut(dim) {
        row.iter_mut().zip(&mean).for_each(|(v, m)| *v -= m);
    }
    Ok(pool)
}

fn check_shape(len: usize, texts: usize, dim: usize, what: &str) -> Result<()> {
    if dim == 0 || texts.checked_mul(dim) != Some(len) {
        return Err(EngineError::Input(format!(
            "{what}: {len} values do not form a [{texts}, {dim}] array; expected texts × dim values \
             with dim > 0"
        )));
    }
    Ok(())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Decomposes `target` (length `dim`) into at most `m` atoms by orthogonal matching pursuit and
/// returns `(atom index, coefficient)` pairs in selection order, with the least-squares
/// coefficients of the final step.
///
/// The pursuit computes the correlations with the residual directly, as scikit-learn's Cholesky
/// variant does. It stops before `m` atoms where scikit-learn does. That happens when the best
/// atom is one already selected, which means that the residual is numerically zero or that every
/// atom is selected. It also happens when the best atom's squared correlation with the target is
/// below machine epsilon, or when the best atom is numerically a linear combination of the
/// selected ones (squared Cholesky pivot at most machine epsilon).
///
/// # Panics
///
/// Panics if `target` does not have `dim` finite values.
pub fn omp(dictionary: &Dictionary, target: &[f32], m: usize) -> Vec<(usize, f64)> {
    check_targets(dictionary, target, 1);
    let target: Vec<f64> = target.iter().map(|&v| f64::from(v)).collect();
    let target_correlations = dictionary.correlations(&target);

    let mut pursuit = Pursuit::new(m);
    while !pursuit.is_finished() {
        let residual = pursuit.residual(dictionary, &target);
        let atom = pursuit.select(&dictionary.correlations(&residual));
        pursuit.advance(dictionary, atom, target_correlations[atom]);
    }
    pursuit.into_pairs()
}

/// Tuning of `omp_batch_with`.
#[derive(Clone, Debug)]
pub struct OmpOptions {
    /// Memory for cached Gram columns (one f32 column of `texts` values per selected atom), in
    /// bytes. The columns of the atoms that the targets in flight have selected stay cached even
    /// beyond this budget.
    pub gram_cache_bytes: usize,
    /// Steps of each pursuit that select from correlations computed with cached Gram columns.
    /// Such a step costs `texts × selected` reads of f32 columns, which grows with every atom, so
    /// later steps multiply the residuals with the dictionary instead: `texts × dim` multiply-adds
    /// per target in one matrix product for the chunk. `None` uses `dim / 16`.
    pub gram_steps: Option<usize>,
}

impl Default for OmpOptions {
    /// 2 GiB, an estimate of what a desktop can spare: 60% of the 3.6 GB that all Gram columns of
    /// a 30,000-text pool take.
    fn default() -> Self {
        OmpOptions {
            gram_cache_bytes: 2 << 30,
            gram_steps: None,
        }
    }
}

impl OmpOptions {
    /// Returns the number of Gram steps for atoms of length `dim`: `gram_steps`, or `dim / 16`.
    pub fn gram_steps_for(&self, dim: usize) -> usize {
        // NOTE: dim / 16 is where the two kinds of step cost the same in `clip-lens bench-omp` on
        // a 2-core x86-64 with d = 512. The best value depends on memory bandwidth and matrix speed.
        self.gram_steps.unwrap_or(dim / 16)
    }
}

/// Runs `omp` for `count` targets (`targets` is `[count, dim]` row-major) with the default
/// `OmpOptions`; see `omp_batch_with`.
pub fn omp_batch(
    dictionary: &Dictionary,
    targets: &[f32],
    count: usize,
    m: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Vec<Vec<(usize, f64)>> {
    omp_batch_with(
        dictionary,
        targets,
        count,
        m,
        &OmpOptions::default(),
        progress,
    )
}

/// Runs `omp` for `count` targets (`targets` is `[count, dim]` row-major), a chunk of targets at
/// a time in lockstep. Calls `progress` with the number of targets done after every chunk.
///
/// The first `gram_steps` steps use the Gram formulation. The correlations with the residual are
/// `D y - G[:, S] γ` over the selected atoms S, where `D y` comes from one matrix product per
/// chunk. The Gram column `G[:, s] = D d_s` of an atom is computed when a target first selects it,
/// in one matrix product for all atoms new in that step, and stays cached for later targets.
/// Because the cached columns are f32, these correlations only narrow down the candidates. The
/// atoms within twice the bound of their rounding error of the best one are scored again in f64
/// against the residual, as `omp` scores every atom. Later steps compute `D r` for the residuals
/// of all targets in the chunk with one f64 matrix product. The Cholesky factor and the
/// coefficients use f64 dot products of atoms, so results agree with `omp` up to f64 rounding.
///
/// NOTE: once `dim` atoms are selected the residual is rounding noise, and further atoms (for
/// `m > dim`) depend on that noise. They can then differ from `omp`, as both can from
/// scikit-learn.
///
/// # Panics
///
/// Panics if `targets` does not have `count × dim` finite values.
pub fn omp_batch_with(
    dictionary: &Dictionary,
    targets: &[f32],
    count: usize,
    m: usize,
    options: &OmpOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Vec<Vec<(usize, f64)>> {
    check_targets(dictionary, targets, count);
    if m == 0 || count == 0 {
        progress(count);
        return vec![Vec::new(); count];
    }

    // A chunk's selections stay cached until its targets finish. The chunk size keeps them to half
    // the budget, so that the other half carries columns over from earlier chunks.
    let column_bytes = dictionary.texts * std::mem::size_of::<f32>();
    let capacity = (options.gram_cache_bytes / column_bytes).max(1);
    let gram_steps = options.gram_steps_for(dictionary.dim);
    let pinned_per_target = m.min(gram_steps).saturating_sub(1).max(1);
    let chunk = (capacity / (2 * pinned_per_target)).clamp(1, MAX_CHUNK);

    let mut cache = GramCache::new(dictionary.texts, capacity);
    let mut results = Vec::with_capacity(count);
    for (generation, chunk_targets) in targets.chunks(chunk * dictionary.dim).enumerate() {
        let decompositions = pursue_chunk(
            dictionary,
            chunk_targets,
            m,
            gram_steps,
            &mut cache,
            generation,
        );
        results.extend(decompositions);
        progress(results.len());
    }
    results
}

fn check_targets(dictionary: &Dictionary, targets: &[f32], count: usize) {
    assert_eq!(
        targets.len(),
        count * dictionary.dim,
        "OMP targets: expected {count} × {} values, found {}",
        dictionary.dim,
        targets.len()
    );
    if let Some(index) = targets.iter().position(|v| !v.is_finite()) {
        panic!(
            "OMP targets: target {} has the non-finite value {} at dimension {}",
            index / dictionary.dim,
            targets[index],
            index % dictionary.dim
        );
    }
}

/// Advances the pursuits of a chunk of targets in lockstep, one atom per step, and returns their
/// decompositions. `generation` numbers the chunk for the cache's eviction order.
fn pursue_chunk(
    dictionary: &Dictionary,
    targets: &[f32],
    m: usize,
    gram_steps: usize,
    cache: &mut GramCache,
    generation: usize,
) -> Vec<Vec<(usize, f64)>> {
    let (texts, dim) = (dictionary.texts, dictionary.dim);
    let count = targets.len() / dim;
    let targets: Vec<f64> = targets.iter().map(|&v| f64::from(v)).collect();
    // [count, texts]: row t is D y_t.
    let target_correlations = matmul_transposed(&targets, count, &dictionary.atoms, texts, dim);

    let mut pursuits: Vec<Pursuit> = (0..count).map(|_| Pursuit::new(m)).collect();
    // Reused across steps: a fresh allocation of this size costs page faults at every step.
    let mut residual_correlations = Vec::new();
    for step in 0..m {
        // The unfinished pursuits, each with its target and the target's correlations D y.
        let mut active: Vec<(&mut Pursuit, &[f64], &[f64])> = pursuits
            .iter_mut()
            .zip(targets.chunks_exact(dim))
            .zip(target_correlations.chunks_exact(texts))
            .filter(|((pursuit, _), _)| !pursuit.is_finished())
            .map(|((pursuit, target), correlations)| (pursuit, target, correlations))
            .collect();
        if active.is_empty() {
            break;
        }

        if step < gram_steps {
            for_each_parallel(&mut active, |(pursuit, target, correlations)| {
                let atom = select_by_gram(pursuit, dictionary, target, correlations, cache);
                pursuit.advance(dictionary, atom, correlations[atom]);
            });
        } else {
            let residuals: Vec<f64> = active
                .iter()
                .flat_map(|(pursuit, target, _)| pursuit.residual(dictionary, target))
                .collect();
            residual_correlations.resize(active.len() * texts, 0.0);
            matmul_transposed_into(
                &residuals,
                active.len(),
                &dictionary.atoms,
                texts,
                dim,
                &mut residual_correlations,
            );
            let mut work: Vec<_> = active
                .into_iter()
                .zip(residual_correlations.chunks_exact(texts))
                .collect();
            for_each_parallel(
                &mut work,
                |((pursuit, _, correlations), residual_correlations)| {
                    let atom = pursuit.select(residual_correlations);
                    pursuit.advance(dictionary, atom, correlations[atom]);
                },
            );
        }

        // A Gram step next needs the Gram columns of the atoms that unfinished pursuits selected.
        if step + 1 < gram_steps.min(m) {
            let mut selected: Vec<usize> = pursuits
                .iter()
                .filter(|pursuit| !pursuit.is_finished())
                .filter_map(|pursuit| pursuit.atoms.last().copied())
                .collect();
            selected.sort_unstable();
            selected.dedup();
            cache.insert(dictionary, &selected, generation);
        }
    }
    pursuits.into_iter().map(Pursuit::into_pairs).collect()
}

/// Applies `operation` to every item, on rayon's threads where there are threads.
fn for_each_parallel<T: Send>(items: &mut [T], operation: impl Fn(&mut T) + Sync + Send) {
    #[cfg(not(target_arch = "wasm32"))]
    items.par_iter_mut().for_each(operation);
    #[cfg(target_arch = "wasm32")]
    items.iter_mut().for_each(operation);
}

/// Selects the next atom of `pursuit` for `target`. Computes the correlations `D y - G[:, S] γ`
/// block by block from `D y` and the cached f32 Gram columns, so that each block stays in the CPU
/// cache, then scores the atoms near the best in f64.
fn select_by_gram(
    pursuit: &Pursuit,
    dictionary: &Dictionary,
    target: &[f64],
    target_correlations: &[f64],
    cache: &GramCache,
) -> usize {
    let columns: Vec<&[f32]> = pursuit
        .atoms
        .iter()
        .map(|&atom| cache.column(atom))
        .collect();
    // |G[j, s] - f32(G[j, s])| <= F32_ROUNDING |d_j| |d_s|, so each correlation is off by at most
    // F32_ROUNDING max|d_j| Σ_s |γ_s| |d_s|. The factor 2 covers the f64 arithmetic.
    let weight: f64 = pursuit
        .atoms
        .iter()
        .zip(&pursuit.coefficients)
        .map(|(&atom, coefficient)| coefficient.abs() * dictionary.squared_norms[atom].sqrt())
        .sum();
    let error = 2.0 * F32_ROUNDING * dictionary.max_norm * weight;

    let mut candidates = Candidates::new(2.0 * error);
    let mut block = [0.0f64; ROW_BLOCK];
    for start in (0..target_correlations.len()).step_by(ROW_BLOCK) {
        let end = (start + ROW_BLOCK).min(target_correlations.len());
        let block = &mut block[..end - start];
        block.copy_from_slice(&target_correlations[start..end]);
        subtract_columns(block, &columns, &pursuit.coefficients, start);
        for (offset, value) in block.iter().enumerate() {
            candidates.offer(start + offset, value.abs());
        }
    }

    let residual = pursuit.residual(dictionary, target);
    let mut best = Best::default();
    for atom in candidates.into_atoms() {
        best.offer(atom, dot(dictionary.atom(atom), &residual).abs(), pursuit);
    }
    best.atom
}

/// The atoms whose approximate correlation magnitude is within `margin` of the largest one.
struct Candidates {
    margin: f64,
    largest: f64,
    atoms: Vec<(usize, f64)>,
    /// Length at which atoms that fell out of the margin are dropped.
    prune_at: usize,
}

impl Candidates {
    fn new(margin: f64) -> Self {
        Candidates {
            margin,
            largest: f64::NEG_INFINITY,
            atoms: Vec::new(),
            prune_at: 64,
        }
    }

    fn offer(&mut self, atom: usize, magnitude: f64) {
        if magnitude < self.largest - self.margin {
            return;
        }
        self.largest = self.largest.max(magnitude);
        self.atoms.push((atom, magnitude));
        if self.atoms.len() >= self.prune_at {
            self.prune();
            self.prune_at = (2 * self.atoms.len()).max(64);
        }
    }

    fn prune(&mut self) {
        let threshold = self.largest - self.margin;
        self.atoms.retain(|&(_, magnitude)| magnitude >= threshold);
    }

    fn into_atoms(mut self) -> impl Iterator<Item = usize> {
        self.prune();
        self.atoms.into_iter().map(|(atom, _)| atom)
    }
}

/// Subtracts `Σ_s coefficients[s] × columns[s][start..]` from `block`, four columns per pass to
/// save loads and stores of the block.
fn subtract_columns(block: &mut [f64], columns: &[&[f32]], coefficients: &[f64], start: usize) {
    let end = start + block.len();
    let mut groups = columns.chunks_exact(4).zip(coefficients.chunks_exact(4));
    for (group, c) in &mut groups {
        let rows = block
            .iter_mut()
            .zip(&group[0][start..end])
            .zip(&group[1][start..end])
            .zip(&group[2][start..end])
            .zip(&group[3][start..end]);
        for ((((b, &g0), &g1), &g2), &g3) in rows {
            *b -= c[0] * f64::from(g0)
                + c[1] * f64::from(g1)
                + c[2] * f64::from(g2)
                + c[3] * f64::from(g3);
        }
    }
    let rest = columns.len() - columns.len() % 4;
    for (column, &c) in columns[rest..].iter().zip(&coefficients[rest..]) {
        block
            .iter_mut()
            .zip(&column[start..end])
            .for_each(|(b, &g)| *b -= c * f64::from(g));
    }
}

/// Computes `A Bᵀ` for row-major `a` `[rows_a, inner]` and `b` `[rows_b, inner]`, returning
/// `[rows_a, rows_b]` row-major.
fn matmul_transposed(a: &[f64], rows_a: usize, b: &[f64], rows_b: usize, inner: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; rows_a * rows_b];
    matmul_transposed_into(a, rows_a, b, rows_b, inner, &mut out);
    out
}

/// Computes `A Bᵀ` like `matmul_transposed`, into `out` `[rows_a, rows_b]`.
fn matmul_transposed_into(
    a: &[f64],
    rows_a: usize,
    b: &[f64],
    rows_b: usize,
    inner: usize,
    out: &mut [f64],
) {
    assert_eq!(a.len(), rows_a * inner, "left operand shape");
    assert_eq!(b.len(), rows_b * inner, "right operand shape");
    assert_eq!(out.len(), rows_a * rows_b, "output shape");
    #[cfg(not(target_arch = "wasm32"))]
    let parallelism = gemm::Parallelism::Rayon(0);
    #[cfg(target_arch = "wasm32")]
    let parallelism = gemm::Parallelism::None;
    // SAFETY: the asserts above bound every read of `a` and `b` by the strides given, `out` has
    // rows_a × rows_b elements, and the three buffers do not overlap.
    unsafe {
        gemm::gemm(
            rows_a,
            rows_b,
            inner,
            out.as_mut_ptr(),
            1,
            rows_b as isize,
            false,
            a.as_ptr(),
            1,
            inner as isize,
            b.as_ptr(),
            inner as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Gram columns of selected atoms, in f32, evicted least recently used first once the cache
/// contains more than `capacity` columns.
struct GramCache {
    columns: Vec<Option<Box<[f32]>>>,
    /// The last chunk (generation) that selected each atom.
    last_used: Vec<usize>,
    len: usize,
    capacity: usize,
    /// f64 products before rounding, reused to avoid page faults on a fresh allocation per step.
    products: Vec<f64>,
}

impl GramCache {
    fn new(texts: usize, capacity: usize) -> Self {
        GramCache {
            columns: vec![None; texts],
            last_used: vec![0; texts],
            len: 0,
            capacity,
            products: Vec::new(),
        }
    }

    fn column(&self, atom: usize) -> &[f32] {
        self.columns[atom]
            .as_deref()
            .expect("the Gram column of every selected atom is cached")
    }

    /// Marks `atoms` (sorted, distinct) as used by chunk `generation` and computes the columns
    /// missing from the cache with one matrix product.
    fn insert(&mut self, dictionary: &Dictionary, atoms: &[usize], generation: usize) {
        for &atom in atoms {
            self.last_used[atom] = generation;
        }
        let missing: Vec<usize> = atoms
            .iter()
            .copied()
            .filter(|&atom| self.columns[atom].is_none())
            .collect();
        if missing.is_empty() {
            return;
        }
        self.evict(missing.len(), generation);

        let (texts, dim) = (dictionary.texts, dictionary.dim);
        let rows: Vec<f64> = missing
            .iter()
            .flat_map(|&atom| dictionary.atom(atom))
            .copied()
            .collect();
        // Row i is G[:, missing[i]] because G is symmetric.
        self.products.resize(missing.len() * texts, 0.0);
        let products = &mut self.products;
        matmul_transposed_into(
            &rows,
            missing.len(),
            &dictionary.atoms,
            texts,
            dim,
            products,
        );
        for (&atom, column) in missing.iter().zip(products.chunks_exact(texts)) {
            self.columns[atom] = Some(column.iter().map(|&v| v as f32).collect());
        }
        self.len += missing.len();
    }

    /// Frees room for `incoming` columns by dropping columns that earlier chunks selected, oldest
    /// first, and at least an eighth of the capacity at once so that a full cache is not rescanned
    /// at every step.
    fn evict(&mut self, incoming: usize, generation: usize) {
        let excess = (self.len + incoming).saturating_sub(self.capacity);
        if excess == 0 {
            return;
        }
        let mut candidates: Vec<(usize, usize)> = (0..self.columns.len())
            .filter(|&atom| self.columns[atom].is_some() && self.last_used[atom] < generation)
            .map(|atom| (self.last_used[atom], atom))
            .collect();
        candidates.sort_unstable();
        let target = excess.max(self.capacity / 8);
        for &(_, atom) in candidates.iter().take(target) {
            self.columns[atom] = None;
            self.len -= 1;
        }
    }
}

/// The atom with the largest absolute correlation seen so far.
struct Best {
    atom: usize,
    magnitude: f64,
}

impl Default for Best {
    fn default() -> Self {
        Best {
            atom: 0,
            magnitude: f64::NEG_INFINITY,
        }
    }
}

impl Best {
    /// Keeps `atom` if its magnitude is larger, or equal and earlier in scikit-learn's order.
    fn offer(&mut self, atom: usize, magnitude: f64, pursuit: &Pursuit) {
        if magnitude > self.magnitude
            || (magnitude == self.magnitude && pursuit.position(atom) < pursuit.position(self.atom))
        {
            self.atom = atom;
            self.magnitude = magnitude;
        }
    }
}

/// One target's pursuit: the selected atoms in order, the Cholesky factor of their Gram matrix
/// and their least-squares coefficients.
///
/// scikit-learn's rules, kept here: the correlations are scanned in the order of its column array,
/// and the first maximum wins. Each selection swaps the selected column with the one at position
/// k, the number of atoms selected before. The pursuit stops when the maximum belongs to a
/// selected atom, when the selected atom's squared correlation with the original target (not with
/// the residual) is below `EPSILON`, or when its new squared Cholesky pivot is at most `EPSILON`.
struct Pursuit {
    limit: usize,
    atoms: Vec<usize>,
    /// The two column positions that each selection swapped.
    swaps: Vec<(usize, usize)>,
    /// Lower-triangular factor L with L Lᵀ = Gram matrix of the selected atoms, packed by rows:
    /// row i contains L[i, 0..=i] from offset i (i + 1) / 2.
    factor: Vec<f64>,
    /// Correlations of the selected atoms with the target.
    target_correlations: Vec<f64>,
    coefficients: Vec<f64>,
    stopped: bool,
}

impl Pursuit {
    fn new(limit: usize) -> Self {
        Pursuit {
            limit,
            atoms: Vec::new(),
            swaps: Vec::new(),
            factor: Vec::new(),
            target_correlations: Vec::new(),
            coefficients: Vec::new(),
            stopped: limit == 0,
        }
    }

    fn is_finished(&self) -> bool {
        self.stopped || self.atoms.len() == self.limit
    }

    /// Returns the position of `atom` in scikit-learn's column array after the swaps so far.
    fn position(&self, atom: usize) -> usize {
        self.swaps
            .iter()
            .fold(atom, |position, &(a, b)| match position {
                p if p == a => b,
                p if p == b => a,
                p => p,
            })
    }

    /// Returns the atom with the largest absolute correlation, first in scikit-learn's order on ties.
    fn select(&self, correlations: &[f64]) -> usize {
        let mut best = Best::default();
        for (atom, value) in correlations.iter().enumerate() {
            best.offer(atom, value.abs(), self);
        }
        best.atom
    }

    /// Adds `atom` (the best one by `select`) and solves for the new coefficients, or stops the
    /// pursuit by scikit-learn's rules.
    fn advance(&mut self, dictionary: &Dictionary, atom: usize, target_correlation: f64) {
        let k = self.atoms.len();
        if self.atoms.contains(&atom) || target_correlation * target_correlation < EPSILON {
            self.stopped = true;
            return;
        }

        // Row k of L: w solving L[:k, :k] w = (d_s · d_atom) over the selected atoms s, then the
        // pivot sqrt(|d_atom|² - |w|²).
        let squared_norm = dictionary.squared_norms[atom];
        let mut row: Vec<f64> = self
            .atoms
            .iter()
            .map(|&s| dot(dictionary.atom(s), dictionary.atom(atom)))
            .collect();
        for i in 0..k {
            let sum: f64 = (0..i).map(|j| self.lower(i, j) * row[j]).sum();
            row[i] = (row[i] - sum) / self.lower(i, i);
        }
        let pivot = squared_norm - row.iter().map(|w| w * w).sum::<f64>();
        // scikit-learn checks the pivot only from the second atom on.
        if k > 0 && pivot <= EPSILON {
            self.stopped = true;
            return;
        }
        row.push(pivot.sqrt());
        self.factor.extend(row);

        let position = self.position(atom);
        self.swaps.push((k, position));
        self.atoms.push(atom);
        self.target_correlations.push(target_correlation);
        self.solve();
    }

    /// Solves L Lᵀ γ = (D y)[selected] by forward and back substitution.
    fn solve(&mut self) {
        let n = self.atoms.len();
        let l = |i: usize, j: usize| self.lower(i, j);
        let mut z = self.target_correlations.clone();
        for i in 0..n {
            let sum: f64 = (0..i).map(|j| l(i, j) * z[j]).sum();
            z[i] = (z[i] - sum) / l(i, i);
        }
        for i in (0..n).rev() {
            let sum: f64 = (i + 1..n).map(|j| l(j, i) * z[j]).sum();
            z[i] = (z[i] - sum) / l(i, i);
        }
        self.coefficients = z;
    }

    /// Returns L[i, j] for j <= i.
    fn lower(&self, i: usize, j: usize) -> f64 {
        self.factor[i * (i + 1) / 2 + j]
    }

    /// Computes the residual `target - Σ_s γ_s d_s` of the current coefficients.
    fn residual(&self, dictionary: &Dictionary, target: &[f64]) -> Vec<f64> {
        let mut residual = target.to_vec();
        for (&atom, &coefficient) in self.atoms.iter().zip(&self.coefficients) {
            residual
                .iter_mut()
                .zip(dictionary.atom(atom))
                .for_each(|(r, a)| *r -= coefficient * a);
        }
        residual
    }

    fn into_pairs(self) -> Vec<(usize, f64)> {
        self.atoms.into_iter().zip(self.coefficients).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tie_order_follows_swaps() {
        let mut pursuit = Pursuit::new(3);
        // Selecting atom 5 first swaps positions 0 and 5: atom 0 now sits at position 5.
        pursuit.swaps.push((0, 5));
        assert_eq!(pursuit.position(5), 0);
        assert_eq!(pursuit.position(0), 5);
        assert_eq!(pursuit.position(3), 3);
        // Atoms 0 and 3 tie: atom 3 comes first in scikit-learn's column order.
        assert_eq!(pursuit.select(&[2.0, 0.0, 0.0, -2.0, 1.0, 0.0]), 3);
    }
}

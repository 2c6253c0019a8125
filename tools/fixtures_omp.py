"""Write the sparse-decomposition fixtures in fixtures/omp/ (described in fixtures/omp/README.md):
a seeded pool of unit text embeddings, the authors' dictionary that numpy builds from it, seeded
unit targets, and scikit-learn's orthogonal matching pursuit of every target for m = 8 and 32,
for engine/tests/decompose.rs.

Run with the reference environment (see tools/requirements.txt):

    /opt/refenv/bin/python tools/fixtures_omp.py

Reruns write identical files.
"""

from pathlib import Path

import numpy as np
import sklearn
from sklearn.linear_model import OrthogonalMatchingPursuit, orthogonal_mp

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "omp"

SEED = 4001
TEXTS = 3000
DIM = 64
RANDOM_TARGETS = 25
SPARSE_TARGETS = 25
SPARSE_ATOMS = 5
ATOM_COUNTS = (8, 32)


def unit_rows(array: np.ndarray) -> np.ndarray:
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def authors_dictionary(embeddings: np.ndarray) -> np.ndarray:
    """Build the authors' dictionary in float64: scale by 100, subtract the pool mean, then scale
    every dimension (column) to norm 100 over the pool."""
    pool = embeddings.astype(np.float64) * 100.0
    pool = pool - pool.mean(axis=0)
    return pool / np.linalg.norm(pool, axis=0) * 100.0


def make_targets(rng: np.random.Generator, dictionary: np.ndarray) -> np.ndarray:
    """Return unit targets: random directions, then sparse combinations of a few atoms with 10%
    noise, so that some decompositions have a known sparse solution."""
    random_targets = rng.standard_normal((RANDOM_TARGETS, DIM))
    sparse_targets = []
    for _ in range(SPARSE_TARGETS):
        atoms = rng.choice(TEXTS, size=SPARSE_ATOMS, replace=False)
        weights = rng.uniform(0.5, 2.0, SPARSE_ATOMS) * rng.choice([-1.0, 1.0], SPARSE_ATOMS)
        combination = weights @ unit_rows(dictionary[atoms])
        noise = rng.standard_normal(DIM)
        combination = combination / np.linalg.norm(combination)
        sparse_targets.append(combination + 0.1 * noise / np.linalg.norm(noise))
    return unit_rows(np.vstack([random_targets, np.array(sparse_targets)])).astype(np.float32)


def selection_order(dictionary: np.ndarray, target: np.ndarray, atoms: int) -> np.ndarray:
    """Return the atoms in the order OMP selected them, read from the coefficient path: step s of
    the path has exactly the first s + 1 atoms nonzero."""
    path = orthogonal_mp(dictionary.T, target, n_nonzero_coefs=atoms, return_path=True)
    path = path.reshape(TEXTS, -1)
    order = []
    for step in range(path.shape[1]):
        new = sorted(set(np.flatnonzero(path[:, step])) - set(order))
        assert len(new) == 1, f"path step {step} adds {len(new)} atoms"
        order.append(new[0])
    return np.array(order)


def decompose(dictionary: np.ndarray, targets: np.ndarray, atoms: int):
    """Fit scikit-learn's OMP to every target; return the atoms in selection order and their
    coefficients, padded with -1 and 0 where a pursuit stopped early."""
    model = OrthogonalMatchingPursuit(n_nonzero_coefs=atoms, fit_intercept=False)
    model.fit(dictionary.T, targets.astype(np.float64).T)
    coef = model.coef_
    indices = np.full((len(targets), atoms), -1.0)
    coefficients = np.zeros((len(targets), atoms))
    for t, target in enumerate(targets.astype(np.float64)):
        order = selection_order(dictionary, target, atoms)
        assert set(order) == set(np.flatnonzero(coef[t])), f"target {t}: path and fit disagree"
        indices[t, : len(order)] = order
        coefficients[t, : len(order)] = coef[t, order]
    return indices.astype(np.float32), coefficients


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    embeddings = unit_rows(rng.standard_normal((TEXTS, DIM))).astype(np.float32)
    dictionary = authors_dictionary(embeddings)
    targets = make_targets(rng, dictionary)

    np.save(OUT / "embeddings.npy", embeddings)
    np.save(OUT / "dictionary.npy", dictionary.astype(np.float32))
    np.save(OUT / "targets.npy", targets)
    for atoms in ATOM_COUNTS:
        indices, coefficients = decompose(dictionary, targets, atoms)
        stopped = int((indices < 0).any(axis=1).sum())
        print(f"m = {atoms}: {stopped} of {len(targets)} pursuits stopped early")
        np.save(OUT / f"indices_m{atoms}.npy", indices)
        np.save(OUT / f"coefficients_m{atoms}.npy", coefficients)
    print(f"wrote {OUT} with scikit-learn {sklearn.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()

"""``recursive.factorization``: truncated SVDs (randomised and full) and the input-weighted one, against the
exact SVD in float64."""

from __future__ import annotations

import pytest
import torch

from recursive.factorization import input_whitening, truncated_svd, weighted_truncated_svd


def matrix_with_spectrum(m: int, n: int, decay: float, seed: int = 0) -> torch.Tensor:
    """(m, n) float32 with singular values ``decay ** i``: a slowly decaying spectrum is the hard case for a
    randomised SVD (trained weight residuals decay slowly)."""
    generator = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64)).Q
    return ((u * decay ** torch.arange(k, dtype=torch.float64)) @ v.T).float()


def best_error(matrix: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(matrix.double())
    return s[rank:].square().sum().sqrt().item()


@pytest.mark.parametrize("m, n, rank", [(96, 40, 4), (40, 96, 8), (200, 120, 30)])
@pytest.mark.parametrize("decay", [0.9, 0.99])
def test_randomised_rank_is_near_the_best(m, n, rank, decay):
    matrix = matrix_with_spectrum(m, n, decay)
    left, right = truncated_svd(matrix, rank)
    assert left.shape == (m, rank) and right.shape == (rank, n) and left.dtype == torch.float32
    error = (matrix.double() - left.double() @ right.double()).norm().item()
    assert error <= 1.02 * best_error(matrix, rank)
    again = truncated_svd(matrix, rank)  # seeded: the same factors every time
    assert torch.equal(again[0], left) and torch.equal(again[1], right)


@pytest.mark.parametrize("m, n, rank", [(30, 20, 12), (20, 30, 10**6)])
def test_full_svd_is_the_best_and_exact_at_full_rank(m, n, rank):
    matrix = matrix_with_spectrum(m, n, 0.8)
    left, right = truncated_svd(matrix, rank)
    r = min(rank, m, n)
    assert left.shape == (m, r) and right.shape == (r, n)
    error = (matrix.double() - left.double() @ right.double()).norm().item()
    if r == min(m, n):  # factored in float64: only the float32 rounding of the factors remains
        assert error <= 4 * torch.finfo(torch.float32).eps * matrix.double().norm().item()
    else:
        assert error <= (1 + 1e-5) * best_error(matrix, r)


def test_weighted_svd_minimises_the_output_error():
    """Inputs with a skewed covariance: the weighted factors leave less mean output error than the plain ones, and
    full rank is exact."""
    generator = torch.Generator().manual_seed(1)
    matrix = matrix_with_spectrum(24, 16, 0.9)
    scales = torch.logspace(0, -2, 16, dtype=torch.float64)
    inputs = torch.randn(4096, 16, generator=generator, dtype=torch.float64) * scales
    covariance = inputs.T @ inputs / len(inputs)
    whitening = input_whitening(covariance, damping=0.0)
    assert torch.allclose(whitening @ whitening.T, covariance)

    def output_error(left, right):
        return ((inputs.float() @ (matrix - left @ right).T).double().square().sum(-1).mean()).item()

    plain, weighted = truncated_svd(matrix, 3), weighted_truncated_svd(matrix, 3, whitening)
    assert output_error(*weighted) < 0.9 * output_error(*plain)
    left, right = weighted_truncated_svd(matrix, 16, whitening)
    assert torch.allclose(left @ right, matrix, rtol=0, atol=1e-5)
    assert weighted_truncated_svd(matrix, 3, None)[0].equal(plain[0])


def test_damping_keeps_a_singular_covariance_invertible():
    covariance = torch.zeros(5, 5, dtype=torch.float64)
    covariance[0, 0] = 4.0
    factor = input_whitening(covariance)
    assert torch.isfinite(factor).all() and (factor.diagonal() > 0).all()

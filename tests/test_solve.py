"""The damped Gram solve and its duplicate filter (iefcli.core.solve), in float64, over a table of small
Grams: against slow obvious references (a loop over pairs for the mask, torch.linalg.solve on the kept
submatrix for x), and bit for bit against the implementation the fixed-cost rewrite replaced (kept in
tools/bench_solve.py as the benchmark's baseline). NaN/Inf, singular Grams, both CPU paths (the
branched one and the accelerator's branch-free one, forced with ``branch_free=True``)."""

from __future__ import annotations

import math

import pytest
import torch

from iefcli.core.solve import SolveInfo, duplicate_mask, solve_gram
from tool_scripts import load_tool

F64 = torch.float64
TINY = torch.finfo(F64).tiny
def _tool():
    return load_tool("bench_solve")


OLD = _tool()


# ----------------------------------------------------------------------------- references


def ref_mask(c: torch.Tensor, threshold) -> list[bool]:
    """The rule, pair by pair: drop an all-zero row; drop i when some non-zero j has
    |C_ij / (n_i n_j)| > threshold and a larger norm, or the same norm and j < i."""
    m = c.shape[0]
    d = [float(c[i, i]) for i in range(m)]
    # The norm is torch's float64 sqrt (on the CPU not always correctly rounded: math.sqrt can
    # differ by an ulp, which decides a near-tie differently).
    n = [float(torch.tensor(max(v, TINY), dtype=F64).sqrt()) if not math.isnan(v) else math.nan for v in d]
    keep = []
    for i in range(m):
        if not d[i] > 0:
            keep.append(False)
            continue
        dropped = False
        if threshold:
            for j in range(m):
                if j == i or not d[j] > 0:
                    continue
                beats = n[j] > n[i] or (n[j] == n[i] and j < i)
                if beats and abs(float(c[i, j]) / (n[i] * n[j])) > threshold:
                    dropped = True
                    break
        keep.append(not dropped)
    return keep


def ref_solve(c: torch.Tensor, b: torch.Tensor, lam: float, threshold) -> torch.Tensor:
    """x_K = (C_KK + lam I)^{-1} b_K on the kept rows K, 0 elsewhere."""
    k = torch.tensor(ref_mask(c, threshold))
    idx = k.nonzero().flatten()
    x = torch.zeros(c.shape[0], dtype=F64)
    if len(idx):
        ckk = c[idx][:, idx]
        x[idx] = torch.linalg.solve(ckk + lam * torch.eye(len(idx), dtype=F64), b[idx])
    return x


# ----------------------------------------------------------------------------- the case table


def _rows(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    r = torch.randn(8, 12, dtype=F64, generator=g)
    if name == "full_rank":
        return r
    if name == "exact_duplicates":  # rows 5 and 2 equal to 1: equal norms, the earliest (1) stays
        r[2] = r[1]
        r[5] = r[1]
        return r
    if name == "anti_parallel":  # cos -1, equal norms: the later one goes
        r[6] = -r[3]
        return r
    if name == "scaled_copies":  # the smaller norm goes, wherever it sits
        r[0] = 0.5 * r[4]
        r[7] = 3.0 * r[2]
        return r
    if name == "zero_rows":
        r[0] = 0.0
        r[4] = 0.0
        return r
    if name == "near_threshold":  # |cos| 0.995 (dropped at 0.99) and 0.985 (kept at 0.99)
        extra = torch.randn(2, 12, dtype=F64, generator=g)  # directions outside the rows' span
        q, _ = torch.linalg.qr(torch.cat([r[:1], extra]).T)
        u, v, w = q.T
        r[0] = u
        r[2] = 2.0 * (0.995 * u + math.sqrt(1 - 0.995**2) * v)
        r[3] = 0.5 * (0.985 * u - math.sqrt(1 - 0.985**2) * w)
        return r
    if name == "tied_norms_not_close":  # equal norms, orthogonal: nothing dropped
        q, _ = torch.linalg.qr(r.T)
        return q.T.contiguous()
    if name == "rank_deficient":  # 8 rows in 5 dimensions: singular Gram
        return r[:, :5].contiguous()
    if name == "one_row":
        return r[:1]
    if name == "all_zero":
        return torch.zeros(4, 6, dtype=F64)
    raise KeyError(name)


CASES = ("full_rank", "exact_duplicates", "anti_parallel", "scaled_copies", "zero_rows", "near_threshold",
         "tied_norms_not_close", "rank_deficient", "one_row", "all_zero")
THRESHOLDS = (0.99, 0.5, None, 0)


def _problem(name):
    r = _rows(name)
    g = torch.Generator().manual_seed(len(name))
    return r @ r.T, torch.randn(r.shape[0], dtype=F64, generator=g)


def _same(u: torch.Tensor, v: torch.Tensor) -> bool:
    """Equal values (NaN where NaN) and dtype; +0.0 and -0.0 count as equal."""
    if u.dtype != v.dtype or u.shape != v.shape:
        return False
    if u.is_floating_point():
        return torch.equal(u.isnan(), v.isnan()) and torch.equal(u.nan_to_num(7.0), v.nan_to_num(7.0))
    return torch.equal(u, v)


def _same_solution(new, old) -> None:
    (x1, i1), (x0, i0) = new, old
    assert _same(x1, x0), (x1, x0)
    for f in ("residual", "rows_kept", "cond", "fallback"):
        a, b = getattr(i1, f), getattr(i0, f)
        assert isinstance(a, torch.Tensor) and a.dim() == 0 and _same(a, b), (f, a, b)


# ----------------------------------------------------------------------------- the duplicate rule


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_duplicate_mask_matches_the_pairwise_rule_and_the_old_mask(name, threshold):
    c, _ = _problem(name)
    keep = duplicate_mask(c, threshold)
    assert keep.dtype == torch.bool and keep.tolist() == ref_mask(c, threshold)
    assert torch.equal(keep, OLD.old_duplicate_mask(c, threshold))


def test_duplicate_mask_table_has_the_expected_drops():
    """The table exercises what it says (so the comparisons above are not vacuous)."""
    def dropped(name, t=0.99):
        return [i for i, k in enumerate(duplicate_mask(_problem(name)[0], t).tolist()) if not k]

    assert dropped("full_rank") == [] and dropped("tied_norms_not_close") == []
    assert dropped("exact_duplicates") == [2, 5]  # ties: the later rows go, row 1 stays
    assert dropped("anti_parallel") == [6]
    assert dropped("scaled_copies") == [0, 2]  # the smaller of each pair, earlier or later
    assert dropped("zero_rows") == [0, 4] and dropped("zero_rows", None) == [0, 4]
    assert dropped("near_threshold") == [0] and dropped("near_threshold", 0.999) == []
    assert dropped("all_zero", None) == [0, 1, 2, 3]


def test_duplicate_mask_ties_zero_and_nan_rows():
    # Equal norms everywhere: rows 0, 2 identical, row 3 = -row 1: the later of each pair goes.
    rows = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, -1.0, 0]], dtype=F64)
    c = rows @ rows.T
    assert duplicate_mask(c, 0.99).tolist() == [True, True, False, False]
    # A zero row never beats a row, not even one whose (subnormal) squared norm clamps to the same
    # norm and which comes later: a (non-PSD) Gram whose zero-diagonal row has off-diagonal mass.
    c = torch.tensor([[0.0, 2e-308], [2e-308, 1e-320]], dtype=F64)
    assert duplicate_mask(c, 0.5).tolist() == [False, True] == ref_mask(c, 0.5)
    assert torch.equal(duplicate_mask(c, 0.5), OLD.old_duplicate_mask(c, 0.5))
    # |cos| exactly at the threshold is not a duplicate (strictly greater).
    rows = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64)
    c = rows @ rows.T
    at = float(c[0, 1] / (c[0, 0].sqrt() * c[1, 1].sqrt()))
    assert duplicate_mask(c, at).tolist() == [True, True] == ref_mask(c, at)
    assert duplicate_mask(c, math.nextafter(at, 0.0)).tolist() == [False, True]
    # A NaN row is dropped and beats nothing; the others are judged among themselves.
    rows = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]], dtype=F64)
    c = rows @ rows.T
    c[2, :] = c[:, 2] = float("nan")
    assert duplicate_mask(c, 0.99).tolist() == [False, True, False] == ref_mask(c, 0.99)
    assert torch.equal(duplicate_mask(c, 0.99), OLD.old_duplicate_mask(c, 0.99))
    # Subnormal squared norms clamp to the same norm: a tie, decided by the index.
    c = torch.tensor([[1e-320, 1e-320], [1e-320, 2e-320]], dtype=F64)
    assert duplicate_mask(c, 0.5).tolist() == ref_mask(c, 0.5) == OLD.old_duplicate_mask(c, 0.5).tolist()


def test_duplicate_mask_on_an_empty_gram_and_the_input_untouched():
    assert duplicate_mask(torch.zeros(0, 0, dtype=F64), 0.99).shape == (0,)
    c, _ = _problem("exact_duplicates")
    before = c.clone()
    duplicate_mask(c, 0.99)
    solve_gram(c, torch.ones(8, dtype=F64), 1e-3)
    assert torch.equal(c, before)


@pytest.mark.parametrize("seed", range(40))
def test_duplicate_mask_random_grams_with_copies(seed):
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(2, 24, (1,), generator=g))
    r = torch.randn(m, 6, dtype=F64, generator=g)
    for k in range(m):  # exact and scaled copies (ties and near-ties), zero rows
        u = float(torch.rand(1, generator=g))
        j = int(torch.randint(0, m, (1,), generator=g))
        if u < 0.2:
            r[k] = r[j]
        elif u < 0.3:
            r[k] = -float(torch.rand(1, generator=g)) * r[j]
        elif u < 0.4:
            r[k] = 0.0
    c = r @ r.T
    for t in (0.99, 0.9, 0.3, None):
        assert duplicate_mask(c, t).tolist() == ref_mask(c, t)


# ----------------------------------------------------------------------------- the solve


@pytest.mark.parametrize("name", [n for n in CASES if n != "rank_deficient"])
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("branch_free", [False, True])
def test_solve_matches_the_kept_submatrix_solve(name, threshold, branch_free):
    c, b = _problem(name)
    for lam in (1e-3, 1e-8):
        x, info = solve_gram(c, b, lam, dup_threshold=threshold, branch_free=branch_free)
        expect = ref_solve(c, b, lam, threshold)
        k = ref_mask(c, threshold)
        idx = torch.tensor(k).nonzero().flatten()
        # Round-off of a backward-stable solve: ~eps * cond(C_KK + lam I) relative (with the filter
        # off, copies make C_KK singular and only the damping bounds the condition number).
        ev = torch.linalg.eigvalsh(c[idx][:, idx] + lam * torch.eye(len(idx), dtype=F64)) if len(idx) else None
        cond = float(ev.max() / ev.min()) if ev is not None else 1.0
        tol = max(1e-12, 100 * torch.finfo(F64).eps * cond)
        assert float((x - expect).abs().max()) <= tol * float(expect.abs().max().clamp_min(1e-300))
        assert int(info.rows_kept) == sum(k) and not bool(info.fallback)
        assert all(float(x[i]) == 0.0 for i in range(len(k)) if not k[i])


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("threshold", (0.99, None))
@pytest.mark.parametrize("lam", (0.0, 1e-10, 1e-3))
@pytest.mark.parametrize("branch_free", [False, True])
def test_solve_is_the_old_solve_bit_for_bit(name, threshold, lam, branch_free):
    """x (up to the sign of a zero), residual, rows_kept, cond, fallback: the values the replaced
    implementation gave, on every path (Cholesky, CPU eigen fallback, branch-free floor)."""
    c, b = _problem(name)
    _same_solution(solve_gram(c, b, lam, dup_threshold=threshold, branch_free=branch_free),
                   OLD.old_solve_gram(c, b, lam, dup_threshold=threshold, branch_free=branch_free))


@pytest.mark.parametrize("seed", range(30))
def test_solve_random_grams_are_the_old_solve(seed):
    g = torch.Generator().manual_seed(100 + seed)
    m = int(torch.randint(1, 40, (1,), generator=g))
    r = torch.randn(m, int(torch.randint(1, 50, (1,), generator=g)), dtype=F64, generator=g)
    for k in range(m):
        u = float(torch.rand(1, generator=g))
        if u < 0.15:
            r[k] = r[int(torch.randint(0, m, (1,), generator=g))]
        elif u < 0.25:
            r[k] = 0.0
    dtype = torch.float32 if seed % 3 == 0 else F64  # a float32 Gram is solved in float64 too
    c, b = (r @ r.T).to(dtype), torch.randn(m, dtype=F64, generator=g).to(dtype)
    for lam in (0.0, 1e-6):
        for t in (0.99, None):
            for bf in (False, True):
                _same_solution(solve_gram(c, b, lam, dup_threshold=t, branch_free=bf),
                               OLD.old_solve_gram(c, b, lam, dup_threshold=t, branch_free=bf))


def test_singular_gram_at_zero_damping_cpu_eigen_and_branch_free():
    c, b = _problem("rank_deficient")  # 8 x 8 of rank 5: Cholesky fails at damping 0
    x, info = solve_gram(c, b, 0.0, dup_threshold=None)
    assert bool(info.fallback) and int(info.rows_kept) == 8
    # CPU: the minimum-norm solution, the pseudo-inverse (J^T x is what reaches the direction).
    assert torch.allclose(x, torch.linalg.pinv(c, hermitian=True) @ b, rtol=1e-8, atol=1e-10)
    xb, ib = solve_gram(c, b, 0.0, dup_threshold=None, branch_free=True)
    assert bool(ib.fallback) and bool(torch.isfinite(xb).all())
    tau = torch.finfo(F64).eps ** 0.5 * float(c.diagonal().max())
    floor = torch.linalg.solve(c + tau * torch.eye(8, dtype=F64), b)
    assert torch.allclose(xb, floor, rtol=1e-6)


# ----------------------------------------------------------------------------- NaN / Inf


def _poisoned(where: str):
    c, b = _problem("scaled_copies")  # rows 0 and 2 dropped at 0.99
    if where == "nan-diag":
        c[3, 3] = float("nan")
    elif where == "inf-diag":
        c[5, 5] = float("inf")
    elif where == "nan-lower-only":  # below the diagonal only: the part Cholesky reads
        c[6, 1] = float("nan")
    elif where == "inf-upper-only":  # above the diagonal only: the part Cholesky never reads
        c[1, 6] = float("inf")
    elif where == "nan-dropped-row":
        c[0, 5] = c[5, 0] = float("nan")
    elif where == "nan-rhs":
        b[4] = float("nan")
    elif where == "inf-rhs-dropped-row":
        b[2] = float("-inf")
    elif where == "inf-rhs":  # Inf, not NaN, would reach x through the triangular solves
        b[5] = float("inf")
    return c, b


POISON = ("nan-diag", "inf-diag", "nan-lower-only", "inf-upper-only", "nan-dropped-row", "nan-rhs",
          "inf-rhs", "inf-rhs-dropped-row")


@pytest.mark.parametrize("where", POISON)
@pytest.mark.parametrize("threshold", (0.99, None))
@pytest.mark.parametrize("lam", (0.0, 1e-3))
@pytest.mark.parametrize("branch_free", [False, True])
def test_non_finite_input_gives_all_nan_x_and_never_raises(where, threshold, lam, branch_free):
    c, b = _poisoned(where)
    x, info = solve_gram(c, b, lam, dup_threshold=threshold, branch_free=branch_free)
    assert x.shape == (8,) and bool(torch.isnan(x).all())
    info.as_floats()
    _same_solution((x, info), OLD.old_solve_gram(c, b, lam, dup_threshold=threshold, branch_free=branch_free))


def test_a_finite_gram_whose_sum_overflows_still_solves():
    """The one-read check sums the Gram; a sum that overflows only takes the general path."""
    c = torch.diag(torch.tensor([1e308, 1e308, 1e308, 1.0], dtype=F64))
    b = torch.tensor([1e300, -2e300, 3e300, 4.0], dtype=F64)
    x, info = solve_gram(c, b, 1e-3, dup_threshold=None)
    assert bool(torch.isfinite(x).all()) and not bool(info.fallback)
    assert torch.allclose(x, b / (c.diagonal() + 1e-3), rtol=1e-15)
    _same_solution((x, info), OLD.old_solve_gram(c, b, 1e-3, dup_threshold=None))


# ----------------------------------------------------------------------------- host reads


def test_cpu_solve_reads_the_host_once(monkeypatch):
    """The common CPU case decides everything from one read (a CPU memory read; on an accelerator
    the branch-free path reads nothing, see test_core_device)."""
    c, b = _problem("scaled_copies")
    reads = []
    for attr in ("__bool__", "item", "__float__", "__int__", "__index__", "tolist"):
        orig = getattr(torch.Tensor, attr)

        def counting(self, *a, _orig=orig, _attr=attr, **k):
            reads.append(_attr)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, counting)
    x, info = solve_gram(c, b, 1e-3)
    n_cpu = len(reads)
    reads.clear()
    solve_gram(c, b, 1e-3, branch_free=True)
    n_free = len(reads)
    monkeypatch.undo()
    assert n_cpu == 1 and n_free == 0
    assert isinstance(info, SolveInfo)


def test_negative_damping_is_refused():
    c, b = _problem("full_rank")
    with pytest.raises(ValueError, match="damping must be >= 0"):
        solve_gram(c, b, -1e-3)


# ----------------------------------------------------------------------------- the benchmark script


def test_bench_solve_prints_old_and_new_per_size(capsys):
    assert OLD.main(["--sizes", "4,8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cpu ms per call") and out[2].startswith("| M | solve_gram (threshold 0.99) |")
    assert [line.split("|")[1].strip() for line in out[4:6]] == ["4", "8"]
    r = OLD.measure(8, repeats=1, target_ms=0.5)
    for k in ("solve", "solve_nodup", "mask"):
        for clock in ("wall", "cpu"):
            assert r[f"{k}_{clock}_old_ms"] > 0 and r[f"{k}_{clock}_new_ms"] > 0


def test_bench_solve_models_mode_swaps_the_solve_back():
    from iefcli import directions

    rows = OLD.measure_models(["mlp:6-5-3"], 4, repeats=1, warmup=0)
    assert set(rows[0]) >= {"sgd_ms", "ief_ms", "ief_old_solve_ms", "sgd_cpu_ms", "ief_cpu_ms", "ief_old_solve_cpu_ms"}
    assert directions.solve_gram is solve_gram

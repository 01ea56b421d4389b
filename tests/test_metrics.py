"""Companion metrics, DTW and comparison statistics against independent computations."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

from affjax import compare
from affjax import metrics


def _pair(n, d, seed=0, dead=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + rng.normal(size=d)
    x[:, :dead] -= 50.0
    return x, np.maximum(x, 0.0)


def _cka_hsic(x, y):
    """The published Gram-matrix form with an explicit centring matrix H."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(a, b):
        return np.sum((h @ a @ a.T @ h) * (h @ b @ b.T @ h))

    return hsic(x, y) / np.sqrt(hsic(x, x) * hsic(y, y))


@pytest.mark.parametrize("n,d", [(60, 5), (8, 20)])  # feature-space and sample-space branches
def test_linear_cka_matches_gram_form(n, d):
    x, y = _pair(n, d, seed=n)
    got = float(metrics.linear_cka(x, y))
    assert got == pytest.approx(_cka_hsic(x, y), rel=1e-10)
    assert 0.0 < got < 1.0
    assert float(metrics.linear_cka(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_float32_close_to_float64():
    x, y = _pair(200, 16, seed=3)
    got = float(metrics.linear_cka(x.astype(np.float32), y.astype(np.float32)))
    assert got == pytest.approx(_cka_hsic(x, y), abs=1e-5)


def test_sparsity_counts_small_magnitudes():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(7, 3, 4, 5)) * 1e-3
    expected = np.mean(np.abs(v) <= 1e-3)
    assert float(metrics.sparsity(v)) == pytest.approx(expected, abs=1e-15)
    assert 0.5 < expected < 0.8
    assert float(metrics.sparsity(v, threshold=0.0)) == 0.0


def _entropy_reference(v):
    d = v.shape[1]
    out = []
    for row in v:
        counts, _ = np.histogram(row, bins=d, range=(row.min(), row.max()))
        out.append(scipy_entropy(counts / d) + np.log(d))
    return np.mean(out)


def test_histogram_entropy_matches_numpy_histograms():
    x, y = _pair(40, 30, seed=2, dead=5)
    assert float(metrics.histogram_entropy(x)) == pytest.approx(_entropy_reference(x), rel=1e-12)
    assert float(metrics.histogram_entropy(y)) == pytest.approx(_entropy_reference(y), rel=1e-12)
    # A constant row puts everything in one bin: entropy 0, plus log(bins).
    const = np.vstack([np.full(30, 2.0), x[0]])
    assert float(metrics.histogram_entropy(const)) == pytest.approx(
        (np.log(30) + scipy_entropy(np.histogram(x[0], bins=30)[0] / 30) + np.log(30)) / 2)


def test_difference_norm_is_frobenius():
    x, y = _pair(20, 6, seed=4)
    assert float(metrics.difference_norm(x, y)) == pytest.approx(np.linalg.norm(x - y), rel=1e-13)
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.difference_norm(x, y[:, :3])


@pytest.mark.parametrize("n,d", [(80, 6), (10, 30)])
def test_linear_fit_r2_matches_scikit_learn(n, d):
    x, y = _pair(n, d, seed=5, dead=2)
    y[:, 1] = 0.7  # a constant output column, fitted exactly: R^2 = 1 by sklearn's convention
    per_column = r2_score(y, LinearRegression().fit(x, y).predict(x), multioutput="raw_values")
    # sklearn itself applies the convention only when its fit of the column is exact to the
    # last bit; for 0.7 its rounding noise makes it 0, so the constant columns are set here.
    constant = np.ptp(y, axis=0) == 0
    expected = np.where(constant, 1.0, per_column).mean()
    assert constant[:2].all()  # the dead column (all 0) and the 0.7 one
    assert float(metrics.linear_fit_r2(x, y)) == pytest.approx(expected, abs=1e-9)
    if d >= n:  # the minimum-norm fit interpolates every non-constant column
        y = np.delete(y, 1, axis=1)
        assert float(metrics.linear_fit_r2(x, y)) == pytest.approx(1.0, abs=1e-9)


def test_linear_fit_r2_of_tanh_below_one_and_affine_is_one():
    x, _ = _pair(100, 4, seed=6)
    y = np.tanh(x)
    r2 = float(metrics.linear_fit_r2(x, y))
    assert r2 == pytest.approx(LinearRegression().fit(x, y).score(x, y), abs=1e-10)
    assert r2 < 0.99
    assert float(metrics.linear_fit_r2(x, x @ np.ones((4, 2)) - 3)) == pytest.approx(1.0, abs=1e-12)


def test_layer_metrics_keys_and_full_sparsity():
    x, y = _pair(30, 5, seed=7)
    out = metrics.layer_metrics(x, y, full_sparsity=(0.25, 0.5))
    assert tuple(out) == metrics.METRIC_NAMES
    assert out["sparsity_before"] == 0.25 and out["sparsity_after"] == 0.5
    assert out["cka"] == pytest.approx(_cka_hsic(x, y), rel=1e-10)


def _dtw_direct(a, b):
    m, n = len(a), len(b)
    acc = np.full((m + 1, n + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            acc[i, j] = abs(a[i - 1] - b[j - 1]) + min(acc[i - 1, j], acc[i, j - 1],
                                                       acc[i - 1, j - 1])
    return acc[m, n]


@pytest.mark.parametrize("m,n", [(1, 1), (1, 6), (5, 5), (7, 3), (12, 17)])
def test_dtw_matches_direct_dynamic_programming(m, n):
    rng = np.random.default_rng(m * 31 + n)
    a, b = rng.uniform(size=m), rng.uniform(size=n)
    assert metrics.dtw_distance(a, b) == pytest.approx(_dtw_direct(a, b), abs=1e-12)
    assert metrics.dtw_distance(b, a) == pytest.approx(metrics.dtw_distance(a, b), abs=1e-12)


def test_dtw_known_values_and_matrix():
    assert metrics.dtw_distance([0, 1, 1, 2], [0, 1, 2]) == 0.0  # repeats are free
    assert metrics.dtw_distance([0.0], [1.0, 2.0]) == 3.0
    seqs = [[0.5, 0.6, 0.9], [0.5, 0.9], [0.1, 0.2, 0.2, 0.3]]
    mat = metrics.dtw_matrix(seqs)
    assert np.allclose(mat, mat.T) and np.all(np.diag(mat) == 0)
    assert mat[0, 2] == pytest.approx(_dtw_direct(seqs[0], seqs[2]))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.dtw_distance([], [1.0])


def test_summary_statistics_and_correlations():
    rng = np.random.default_rng(8)
    sigs = {f"m{i}": rng.uniform(0.5, 1.0, size=5 + i) for i in range(5)}
    stats = {k: compare.summary_statistics(v) for k, v in sigs.items()}
    v = sigs["m2"]
    assert stats["m2"] == pytest.approx({"mean": v.mean(), "std": v.std(), "min": v.min(),
                                         "max": v.max(), "max_over_mean": v.max() / v.mean()})
    acc = {k: 60.0 + 10 * s["mean"] + rng.normal() for k, s in stats.items()}
    corr = compare.correlations(stats, acc)
    means = np.array([stats[k]["mean"] for k in sigs])
    accs = np.array([acc[k] for k in sigs])
    assert corr["mean"]["pearson"] == pytest.approx(np.corrcoef(means, accs)[0, 1], abs=1e-12)

    def ranks(a):
        return np.argsort(np.argsort(a)).astype(float)

    assert corr["mean"]["spearman"] == pytest.approx(
        np.corrcoef(ranks(means), ranks(accs))[0, 1], abs=1e-12)
    with pytest.raises(compare.AccuracyError, match="no accuracy for"):
        compare.correlations(stats, {"m0": 1.0})


def _brute_force_p(x, y):
    """Two-sided permutation p-value of Pearson's r over every pairing, straight from the
    definition (scipy.stats.permutation_test's: twice the smaller tail)."""
    perms = np.array(list(itertools.permutations(range(len(y)))))
    r = np.corrcoef(x, y)[0, 1]
    ys = y[perms] - y.mean()
    null = ys @ (x - x.mean()) / (np.linalg.norm(x - x.mean()) * np.linalg.norm(y - y.mean()))
    low, high = np.mean(null <= r + 1e-9), np.mean(null >= r - 1e-9)
    return r, min(1.0, 2 * min(low, high))


def test_exact_p_values_match_scipy_and_the_definition():
    from scipy import stats

    rng = np.random.default_rng(3)

    def spearman(a, b, axis=-1):
        return stats.pearsonr(stats.rankdata(a, axis=-1), stats.rankdata(b, axis=-1),
                              axis=-1).statistic

    def pearson(a, b, axis=-1):
        return stats.pearsonr(a, b, axis=-1).statistic

    for n in (3, 4, 5):  # SciPy's enumeration takes seconds from n = 6
        x = rng.normal(size=n)
        for y in (x + rng.normal(size=n), np.round(rng.normal(size=n))):  # ties in the 2nd
            for method, statistic in (("pearson", pearson), ("spearman", spearman)):
                want = stats.permutation_test((x, y), statistic, vectorized=True,
                                              permutation_type="pairings", n_resamples=np.inf)
                r, p = compare.exact_correlation_test(x, y, method=method)
                assert r == pytest.approx(want.statistic, abs=1e-12)
                assert p == pytest.approx(want.pvalue, abs=1e-12), (n, method)
    # Above 8 pairs the enumeration is split into heads and tails of 8! orderings.
    for n in (7, 9):
        x, y = rng.normal(size=n), rng.normal(size=n)
        y[:3] += 2 * x[:3]
        r, p = _brute_force_p(x, y)
        assert compare.exact_correlation_test(x, y, method="pearson") == pytest.approx(
            (r, p), abs=1e-12)
        rx, ry = stats.rankdata(x), stats.rankdata(y)
        assert compare.exact_correlation_test(x, y) == pytest.approx(
            _brute_force_p(rx, ry), abs=1e-12)


def test_correlations_of_three_models_are_not_significant():
    # Three models in reverse order of accuracy: Spearman -1, and 1 of the 6 pairings is as
    # extreme on each side: p = 1/3 (SciPy's large-sample p was 0.000).
    stats = {k: compare.summary_statistics(v) for k, v in
             {"a": [0.9, 0.9], "b": [0.8, 0.7], "c": [0.5, 0.6]}.items()}
    out = compare.correlations(stats, {"a": 60.0, "b": 70.0, "c": 75.0})
    assert out["mean"]["spearman"] == -1.0
    assert out["mean"]["spearman_p"] == pytest.approx(1 / 3, abs=1e-15)
    assert out["mean"]["pearson_p"] == pytest.approx(1 / 3, abs=1e-15)
    assert {c["p_method"] for c in out.values()} == {"exact"}
    # Above EXACT_P_MAX_MODELS, SciPy's large-sample p-values.
    rng = np.random.default_rng(5)
    n = compare.EXACT_P_MAX_MODELS + 2
    stats = {f"m{i}": compare.summary_statistics(rng.uniform(0.5, 1, 6)) for i in range(n)}
    acc = {k: 60 + 20 * s["mean"] + rng.normal() for k, s in stats.items()}
    out = compare.correlations(stats, acc)
    from scipy.stats import spearmanr

    means = [s["mean"] for s in stats.values()]
    assert out["mean"]["spearman_p"] == spearmanr(means, list(acc.values())).pvalue
    assert out["mean"]["p_method"] == "asymptotic"


def test_read_accuracy_keeps_every_row_or_says_why_not(tmp_path):
    headerless = tmp_path / "plain.csv"
    headerless.write_text("resnet18,69.76\nvgg11,69.02\nalexnet,56.52\n")  # first row was lost
    assert compare.read_accuracy(headerless) == {"resnet18": 69.76, "vgg11": 69.02,
                                                 "alexnet": 56.52}
    (tmp_path / "h.csv").write_text("name,top1\n\nresnet18,69.76\n\nvgg11,69.02\n")
    assert compare.read_accuracy(tmp_path / "h.csv") == {"resnet18": 69.76, "vgg11": 69.02}
    for name, text, message in (
            ("twice.csv", "model,acc\nvgg11,69.0\nresnet18,69.8\nvgg11,70.1\n",
             "'vgg11' is listed twice \\(again on line 4\\)"),
            ("twice.json", '{"vgg11": 69.0, "vgg11": 70.1}', "'vgg11' is listed twice"),
            ("unnamed.csv", "resnet18,69.76\n,70.1\n", "line 2 .* has no model name")):
        (tmp_path / name).write_text(text)
        with pytest.raises(compare.AccuracyError, match=rf"{name}: .*{message}"):
            compare.read_accuracy(tmp_path / name)


def test_read_accuracy_json_and_csv(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"resnet18": 69.76, "alexnet": 56.5}))
    assert compare.read_accuracy(tmp_path / "a.json") == {"resnet18": 69.76, "alexnet": 56.5}
    (tmp_path / "a.csv").write_text("model,params,acc@1\nresnet18,11.7,69.76\nalexnet,61,56.5\n")
    assert compare.read_accuracy(tmp_path / "a.csv") == {"resnet18": 69.76, "alexnet": 56.5}
    (tmp_path / "bad.csv").write_text("model,accuracy\nresnet18,high\n")
    with pytest.raises(compare.AccuracyError, match="bad.csv"):
        compare.read_accuracy(tmp_path / "bad.csv")


@pytest.mark.parametrize("value", [0.1, 0.37, float(np.tanh(2.0)), 6.0])
def test_a_constant_column_counts_as_constant_whatever_its_value(value):
    # Its float32 mean need not equal the value; the rounding must not count as variation.
    x, y = _pair(256, 8, seed=9)
    x, y = x.astype(np.float32), y.astype(np.float32)
    y[:, 0] = np.float32(value)
    expected = LinearRegression().fit(x.astype(np.float64), y.astype(np.float64)).score(
        x.astype(np.float64), y.astype(np.float64))
    assert float(metrics.linear_fit_r2(x, y)) == pytest.approx(expected, abs=1e-4)
    constant = np.full((20, 5), np.float32(value))
    other = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    assert np.isnan(float(metrics.linear_cka(constant, other)))
    assert np.isnan(float(metrics.linear_cka(constant, np.tanh(constant))))
    assert float(metrics.linear_fit_r2(other, constant)) == 1.0  # fitted exactly


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1e6, 1e12])
def test_cka_and_r2_do_not_depend_on_scale_in_float32(scale):
    x, y = _pair(64, 6, seed=10)
    wide_x, wide_y = _pair(8, 20, seed=11)  # the sample-space branch of linear_cka
    f32 = np.float32
    assert float(metrics.linear_cka((scale * x).astype(f32), (scale * y).astype(f32))) == \
        pytest.approx(_cka_hsic(x, y), abs=1e-5)
    assert float(metrics.linear_cka((scale * wide_x).astype(f32), wide_y.astype(f32))) == \
        pytest.approx(_cka_hsic(wide_x, wide_y), abs=1e-5)
    expected = LinearRegression().fit(x, y).score(x, y)
    assert float(metrics.linear_fit_r2(x.astype(f32), (scale * y).astype(f32))) == \
        pytest.approx(expected, abs=1e-4)
    assert float(metrics.linear_fit_r2((scale * x).astype(f32), y.astype(f32))) == \
        pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_measured_in_float32(dtype):
    import jax.numpy as jnp

    x, y = _pair(40, 4, seed=12)
    xh, yh = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    x32, y32 = np.asarray(xh.astype(jnp.float32)), np.asarray(yh.astype(jnp.float32))
    got = metrics.layer_metrics(xh, yh)
    want = metrics.layer_metrics(x32, y32)
    assert got == pytest.approx(want, rel=1e-6)
    assert float(metrics.linear_cka(xh, 2 * xh)) == pytest.approx(1.0, abs=1e-5)


def test_metrics_bad_input_names_the_problem():
    x, y = _pair(10, 3, seed=13)
    with pytest.raises(TypeError, match="linear_cka needs real numbers.*bool"):
        metrics.linear_cka(x > 0, y)
    with pytest.raises(TypeError, match="sparsity needs real numbers.*complex"):
        metrics.sparsity(x + 1j)
    with pytest.raises(ValueError, match="linear_fit_r2 needs at least 2 samples"):
        metrics.linear_fit_r2(x[:1], y[:1])
    with pytest.raises(ValueError, match="linear_fit_r2 needs at least 2 samples"):
        metrics.linear_fit_r2(x[:0], y[:0])
    with pytest.raises(ValueError, match="layer_metrics needs two"):
        metrics.layer_metrics(x, y[:5])
    with pytest.raises(ValueError, match=r"histogram_entropy needs a non-empty.*\(3, 0\)"):
        metrics.histogram_entropy(np.zeros((3, 0)))


def test_histogram_entropy_of_non_finite_values_is_nan():
    x, _ = _pair(10, 6, seed=14)
    assert np.isfinite(float(metrics.histogram_entropy(x)))
    for bad in (np.nan, np.inf):
        v = x.copy()
        v[3, 2] = bad
        assert np.isnan(float(metrics.histogram_entropy(v)))


def test_read_accuracy_rejects_values_that_are_not_numbers(tmp_path):
    for name, value in (("null", None), ("list", [69.7]), ("bool", True), ("text", "high")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"resnet18": 69.76, "vgg11": value}))
        with pytest.raises(compare.AccuracyError, match=rf"{name}.json.*'vgg11'.*not a number"):
            compare.read_accuracy(path)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("model,accuracy\nr\xe9seau,70.1\n".encode("latin-1"))
    with pytest.raises(compare.AccuracyError, match="latin1.csv: not UTF-8"):
        compare.read_accuracy(latin1)
    # NaN made every correlation NaN silently; short rows gave "list index out of range".
    nan = tmp_path / "nan.json"
    nan.write_text('{"resnet18": 69.76, "vgg11": NaN}')
    with pytest.raises(compare.AccuracyError, match="'vgg11' is nan, not a finite number"):
        compare.read_accuracy(nan)
    for name, text in (("one.csv", "model\nresnet18\n"),
                       ("semi.csv", "model;accuracy\nresnet18;69.7\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(compare.AccuracyError,
                           match=rf"{name}: line 2 .*has no column 2; expected comma-separated"):
            compare.read_accuracy(tmp_path / name)


def _results(*signatures):
    return [{"layers": [{"name": f"act:{i}", "score": s} for i, s in enumerate(sig)]}
            for sig in signatures]


def test_compare_nan_scores_raise_by_default_or_are_dropped():
    res = _results([0.9, 0.8, 0.7], [0.9, float("nan"), 0.7, float("nan")], [0.5, 0.6])
    with pytest.raises(ValueError, match=r"b: 2 of 4 layers have a NaN score \(act:1, act:3\)"):
        compare.compare(res, ["a", "b", "c"])
    out = compare.compare(res, ["a", "b", "c"], nan="drop")
    assert out["dropped"] == {"b": ["act:1", "act:3"]}
    # b is left with [0.9, 0.7]: the same numbers as comparing that shorter signature.
    clean = compare.compare(_results([0.9, 0.8, 0.7], [0.9, 0.7], [0.5, 0.6]), ["a", "b", "c"])
    assert out["dtw"] == clean["dtw"] and out["statistics"] == clean["statistics"]
    assert np.isfinite(out["dtw"]).all()
    with pytest.raises(ValueError, match="c: every layer has a NaN score"):
        compare.compare(_results([0.9], [0.8], [float("nan")]), ["a", "b", "c"], nan="drop")
    with pytest.raises(ValueError, match="nan must be"):
        compare.compare(res, ["a", "b", "c"], nan="skip")


def test_compare_and_labels_need_one_unique_label_per_result(tmp_path):
    res = _results([0.9, 0.8], [0.7], [0.5])
    with pytest.raises(ValueError, match="one unique label per result"):
        compare.compare(res, ["a", "b"])
    with pytest.raises(ValueError, match="one unique label per result"):
        compare.compare(res, ["a", "a", "c"])
    meta = [{"model": "m", "weights": "w", "dataset": "d"}] * 3
    with pytest.raises(ValueError, match="one path per result"):
        compare.labels_for(meta, ["a.json", "b.json"])
    with pytest.raises(ValueError, match="given twice: .*a.json"):
        compare.labels_for(meta, [str(tmp_path / "a.json"), "b.json",
                                  str(tmp_path / "x" / ".." / "a.json")])

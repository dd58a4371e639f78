"""One case's streamed statistics against the probability-file route, computed independently here: nnU-Net's
probabilities rebuilt in the original frame (softmax inside the crop box, background 1 outside, transposed back)
and fed whole to a CalibrationAccumulator; sample sizes, keys and the pooled fit re-derived by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_mbls.calibration.after_temperature import accumulator_after, is_exact
from nnunet_mbls.calibration.after_temperature import mean_entropy_after
from nnunet_mbls.calibration.case_statistics import (CaseStatistics, StatisticsSettings, band_near_foreground,
                                                     case_statistics, pooled_fit_threshold)
from nnunet_mbls.calibration.metrics import CalibrationAccumulator
from nnunet_mbls.calibration.regions import region_mask
from nnunet_mbls.calibration.subsample import case_seed
from nnunet_mbls.calibration.temperature import apply_temperature, fit_temperature
from nnunet_mbls.errors import InputError

C = 4
TRANSPOSE = [2, 0, 1]
ORIGINAL = (9, 12, 10)  # (z, y, x) of the reference; the transposed frame is (10, 9, 12)
BOX = [[1, 9], [2, 8], [0, 12]]  # nnU-Net's crop box, transposed order


def make_case(seed: int):
    """(logits in the cropped transposed frame, reference in the original frame, properties)."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(ORIGINAL, np.uint8)
    ref[2:8, 3:10, 1:9] = rng.integers(0, C, (6, 7, 8))
    ref[0, 0, 0] = 2  # foreground outside the crop box: nnU-Net gives it background probability 1
    ref_t = ref.transpose(TRANSPOSE)
    inside = tuple(slice(a, b) for a, b in BOX)
    onehot = np.eye(C, dtype=np.float32)[ref_t[inside]].transpose(3, 0, 1, 2)
    logits = torch.from_numpy(rng.normal(0, 2, onehot.shape).astype(np.float32) + 4 * onehot)
    properties = {"bbox_used_for_cropping": BOX, "shape_before_cropping": list(ref_t.shape)}
    return logits, ref, properties


def probabilities_in_original_frame(logits: torch.Tensor, ref_shape) -> np.ndarray:
    """What nnU-Net's export writes into the .npz: softmax in the box, background 1 outside, transposed back."""
    transposed = tuple(ref_shape[a] for a in TRANSPOSE)
    full = torch.zeros(C, *transposed)
    full[0] = 1
    full[(slice(None), *(slice(a, b) for a, b in BOX))] = torch.softmax(logits, 0)
    back = [TRANSPOSE.index(a) for a in range(3)]
    return full.permute(0, *[b + 1 for b in back]).numpy()


def reference_accumulator(probs: np.ndarray, ref: np.ndarray, region: str) -> CalibrationAccumulator:
    box = [BOX[TRANSPOSE.index(a)] for a in range(3)]
    mask = region_mask(ref, region, None, box, 2)
    accumulator = CalibrationAccumulator(C)
    accumulator.update(torch.from_numpy(probs), torch.from_numpy(np.where(mask, ref, 0).astype(np.int64)),
                       torch.from_numpy(mask))
    return accumulator


@pytest.mark.parametrize("region", ["fg", "all", "boundary"])
def test_metrics_as_trained_and_after_t_equal_the_probability_file_route(region):
    logits, ref, properties = make_case(0)
    statistics = case_statistics("case_0", logits, ref, properties, TRANSPOSE, StatisticsSettings(C, region=region))
    probs = probabilities_in_original_frame(logits, ref.shape)
    expected = reference_accumulator(probs, ref, region).compute()
    got = statistics.accumulator().compute()
    for key in ("ece", "cece", "nll", "brier", "mce", "ece_adaptive", "n_voxels"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12, rel=1e-9), key
    assert is_exact(statistics)  # small region: every voxel is in the sample
    after = accumulator_after(statistics, 1.7).compute()
    expected_after = reference_accumulator(apply_temperature(probs, 1.7), ref, region).compute()
    for key in ("ece", "cece", "nll", "brier", "ece_adaptive", "n_voxels"):
        assert after[key] == pytest.approx(expected_after[key], abs=1e-6, rel=1e-6), key


def test_fit_sample_is_the_smallest_keys_of_the_crop_box_voxels():
    logits, ref, properties = make_case(1)
    settings = StatisticsSettings(C, fit_sample_bytes=(4 * C + 10) * 100)  # 100 voxels per case
    statistics = case_statistics("case_1", logits, ref, properties, TRANSPOSE, settings)
    n = int(np.prod([b - a for a, b in BOX]))  # fit region "all" = the crop box, C order of the cropped frame
    keys = torch.rand(n, generator=torch.Generator().manual_seed(case_seed(0, "case_1")), dtype=torch.float64).numpy()
    smallest = np.sort(np.argsort(keys)[:100])
    assert statistics.fit_seen == n and statistics.fit_threshold == pytest.approx(np.sort(keys)[99])
    np.testing.assert_array_equal(statistics.fit_keys, keys[smallest])
    expected = torch.log_softmax(logits.reshape(C, -1)[:, torch.from_numpy(smallest)], 0).T.numpy()
    np.testing.assert_allclose(statistics.fit_log_probs, expected, rtol=1e-6)
    cropped_ref = ref.transpose(TRANSPOSE)[tuple(slice(a, b) for a, b in BOX)].reshape(-1)
    np.testing.assert_array_equal(statistics.fit_target, cropped_ref[smallest])


def test_pooled_temperature_equals_the_fit_on_the_concatenated_voxels(tmp_path):
    from nnunet_mbls.calibration.evaluation.statistics import fit_temperature_on_statistics

    cases = [make_case(seed) for seed in range(3)]
    files, rows, labels = [], [], []
    for i, (logits, ref, properties) in enumerate(cases):
        statistics = case_statistics(f"case_{i}", logits, ref, properties, TRANSPOSE, StatisticsSettings(C))
        files.append(statistics.save(tmp_path / f"case_{i}.npz"))
        rows.append(torch.log_softmax(logits.reshape(C, -1), 0).T)
        labels.append(torch.from_numpy(ref.transpose(TRANSPOSE)[tuple(slice(a, b) for a, b in BOX)].reshape(-1).astype(np.int64)))
    temperature, size = fit_temperature_on_statistics(files, max_voxels=10**6, seed=0)
    assert size == sum(r.shape[0] for r in rows)
    assert temperature == pytest.approx(fit_temperature(torch.cat(rows), torch.cat(labels)), rel=1e-9)


def test_pooled_sample_of_capped_cases_is_the_smallest_keys_below_every_cases_threshold(tmp_path):
    from nnunet_mbls.calibration.evaluation.statistics import fit_temperature_on_statistics

    settings = StatisticsSettings(C, fit_sample_bytes=(4 * C + 10) * 150)
    stats = [case_statistics(f"case_{i}", *make_case(i), TRANSPOSE, settings) for i in range(3)]
    threshold = pooled_fit_threshold(stats)
    assert threshold == min(s.fit_threshold for s in stats) < 1.0
    # every case's keys regenerated here: the pooled rows are all keys <= threshold, capped by max_voxels
    n = stats[0].fit_seen
    all_keys = [torch.rand(n, generator=torch.Generator().manual_seed(case_seed(0, f"case_{i}")),
                           dtype=torch.float64).numpy() for i in range(3)]
    below = sum(int((k <= threshold).sum()) for k in all_keys)
    files = [s.save(tmp_path / f"case_{i}.npz") for i, s in enumerate(stats)]
    assert fit_temperature_on_statistics(files, max_voxels=10**6, seed=0)[1] == below
    assert fit_temperature_on_statistics(files, max_voxels=200, seed=0)[1] == 200


def test_estimator_after_t_on_a_sampled_region_is_close_and_unbiased_over_seeds():
    """A region larger than the sample: the estimate of every metric after T against the exact value; the mean of
    the ECE errors over seeds is near 0 (no systematic bias)."""
    logits, ref, properties = make_case(3)
    probs = probabilities_in_original_frame(logits, ref.shape)
    exact = reference_accumulator(apply_temperature(probs, 2.0), ref, "all").compute()
    errors = []
    for seed in range(12):
        settings = StatisticsSettings(C, region="all", seed=seed, metric_sample_bytes=(4 * C + 4) * 200)
        statistics = case_statistics("case_3", logits, ref, properties, TRANSPOSE, settings)
        assert not is_exact(statistics) and statistics.metric.target.size == 200
        estimate = accumulator_after(statistics, 2.0).compute()
        assert estimate["n_voxels"] == exact["n_voxels"]
        errors.append(estimate["ece"] - exact["ece"])
    assert np.abs(errors).max() < 0.03
    assert abs(np.mean(errors)) < 0.01


def test_scores_of_the_benchmark_equal_the_qc_functions_on_the_probabilities():
    """With the segmentation, the per-case scores (mean entropy over the predicted foreground and boundary band,
    ECE of the reference boundary band) as trained and after T equal those the benchmark computed from the .npz."""
    from nnunet_mbls.benchmark.cases import boundary_ece
    from nnunet_mbls.calibration.evaluation import LabelInfo
    from nnunet_mbls.inference.qc import case_scores

    logits, ref, properties = make_case(6)
    probs = probabilities_in_original_frame(logits, ref.shape)
    segmentation = probs.argmax(0).astype(np.uint8)
    statistics = case_statistics("case_6", logits, ref, properties, TRANSPOSE, StatisticsSettings(C), segmentation)
    labels = LabelInfo(C, None, {i: f"c{i}" for i in range(C)})
    for temperature in (1.0, 0.6, 2.5):
        tempered = apply_temperature(probs, temperature)
        expected = case_scores(segmentation, tempered, (1, 1, 1), {i: f"c{i}" for i in range(1, C)})
        assert mean_entropy_after(statistics.qc["predicted_fg"], temperature) == pytest.approx(expected["mean_entropy_fg"], rel=1e-5)
        assert mean_entropy_after(statistics.qc["predicted_boundary"], temperature) == pytest.approx(
            expected["mean_entropy_boundary"], rel=1e-5)
        ece = accumulator_after(statistics, temperature, statistics.qc["reference_boundary"]).compute()["ece"]
        assert ece == pytest.approx(boundary_ece(tempered, ref, labels), abs=1e-6)


def test_band_near_foreground_equals_the_band_on_the_whole_image():
    rng = np.random.default_rng(0)
    labels = np.zeros((30, 40, 20), np.uint8)
    labels[10:18, 5:12, 0:6] = rng.integers(0, 3, (8, 7, 6))
    labels[12, 30, 10] = 4
    for width in (1, 2, 3):
        np.testing.assert_array_equal(band_near_foreground(labels, 4, width), region_mask(labels, "boundary", 4, None, width))


def test_save_and_load_round_trip(tmp_path):
    logits, ref, properties = make_case(4)
    statistics = case_statistics("case_4", logits, ref, properties, TRANSPOSE, StatisticsSettings(C))
    statistics.model_id = "abc"
    loaded = CaseStatistics.load(statistics.save(tmp_path / "case_4.npz"))
    assert loaded.case == "case_4" and loaded.model_id == "abc" and loaded.settings == statistics.settings
    assert loaded.accumulator().compute() == statistics.accumulator().compute()
    np.testing.assert_array_equal(loaded.fit_log_probs, statistics.fit_log_probs)
    assert (tmp_path / "case_4.npz").stat().st_size < 5e6


def test_logits_that_do_not_fit_the_reference_are_refused():
    logits, ref, properties = make_case(5)
    with pytest.raises(InputError, match="case_5: logits"):
        case_statistics("case_5", logits[:, :-1], ref, properties, TRANSPOSE, StatisticsSettings(C))


def test_a_statistics_file_of_another_version_or_truncated_is_refused_with_the_fix(tmp_path):
    from nnunet_mbls.calibration.case_statistics import StatisticsError
    from nnunet_mbls.calibration.evaluation.statistics import read_headers

    logits, ref, properties = make_case(7)
    path = case_statistics("case_7", logits, ref, properties, TRANSPOSE, StatisticsSettings(C)).save(tmp_path / "case_7.npz")
    with np.load(path) as data:
        arrays = dict(data)
    arrays["header"] = np.array(str(arrays["header"]).replace("'version': 1", "'version': 99"))
    np.savez(tmp_path / "old.npz", **arrays)
    for reader in (CaseStatistics.load, lambda p: read_headers([p])):
        with pytest.raises(StatisticsError, match="statistics format 99.*nnunet-mbls calibrate"):
            reader(tmp_path / "old.npz")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(StatisticsError, match="cannot read the statistics file .*cut.npz.*nnunet-mbls calibrate"):
        CaseStatistics.load(tmp_path / "cut.npz")

"""Cost of the calibration step's statistics in nnU-Net's validation export, at real multi-organ sizes.

One generated case goes through nnU-Net 2.8.1's own export path three ways, each in a fresh process (so that the
peak RSS is the route's own):

- ``stock``: ``export_prediction_from_logits(save_probabilities=False)``, what stock nnU-Net's validation does;
- ``ours``: :func:`nnunet_mbls.calibration.evaluation.export.export_with_statistics` (the same segmentation, plus
  the case's calibration statistics file: reference read, metric sums, fit sample, metric sample);
- ``npz``: ``export_prediction_from_logits(save_probabilities=True)``, the route of nnunet-mbls <= 0.2 (and of
  ``--npz``), whose ``.npz`` the calibration step then read back.

Reported per route: wall time of the export call (median of ``--repeats``, routes interleaved; ``npz`` once),
peak RSS of the process (VmHWM; the logits themselves, loaded before the call, are the baseline every route
shares) and bytes written. ``--estimator`` adds the error of the metrics after T estimated from the statistics
(:mod:`nnunet_mbls.calibration.after_temperature`) against the exact value from the full probabilities, at
several T.

The case: labels of ellipsoids (one per foreground class) in a volume; logits = 8 x one-hot of the labels
shifted by one voxel (so boundaries are wrong), box-blurred over 5 voxels (uncertain boundaries) plus Gaussian
noise; identity spacing (no resampling, the worst case for the ratio, as in the measurement that opened issue 19),
crop box = the whole image. Sizes: ``amos`` 16 classes, 100 x 512 x 512 (26 M voxels); ``amos_resampled`` the same
image with logits on a 100 x 384 x 384 network grid (in-plane spacing 1.0 mm -> 0.75 mm: nnU-Net's export resamples
them, as it does for every case whose spacing differs from the plans'); ``totalseg`` 117 classes, 128 x 160 x 160
(a 1.5 mm abdomen crop, 3.3 M voxels); ``--quick`` 4 classes, 32 x 64 x 64.

    python benchmarks/bench_calibration_step.py --sizes amos totalseg --repeats 3 --estimator --out results.json
    python benchmarks/bench_calibration_step.py --quick     # last line: ratio=<ours/stock> extra_disk_mb_per_case=<MB>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, markdown_table, save_json  # noqa: E402

#: name -> (classes, image shape, network-grid shape of the logits: None = the image's, no resampling)
SIZES = {"quick": (4, (32, 64, 64), None), "amos": (16, (100, 512, 512), None),
         "amos_resampled": (16, (100, 512, 512), (100, 384, 384)), "totalseg": (117, (128, 160, 160), None)}
ROUTES = ("stock", "ours", "npz")
TEMPERATURES = (0.7, 1.3, 2.0)


def make_case(folder: Path, num_classes: int, shape: tuple[int, int, int], network: tuple[int, int, int] | None = None,
              seed: int = 0) -> None:
    """Write logits.npy (C, *network or shape) float32, gt/case.nii.gz, plans.json, dataset.json and
    properties.json."""
    import SimpleITK as sitk
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for label in range(1, num_classes):
        centre = [rng.uniform(0.15, 0.85) * s for s in shape]
        radii = [rng.uniform(0.04, 0.12) * s for s in shape]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1
        labels[inside] = label
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gt").mkdir(exist_ok=True)
    image = sitk.GetImageFromArray(labels)
    shifted = np.roll(labels, 1, axis=2)
    grid = network or shape
    if network is not None:  # the labels on the network grid (nearest neighbour)
        shifted = shifted[np.ix_(*[np.floor(np.arange(n) * s / n).astype(int) for n, s in zip(network, shape)])]
    logits = np.lib.format.open_memmap(folder / "logits.npy", mode="w+", dtype=np.float32, shape=(num_classes, *grid))
    for c in range(num_classes):
        channel = ndimage.uniform_filter((shifted == c).astype(np.float32) * 8.0, size=5)
        channel += rng.normal(0, 0.5, size=grid).astype(np.float32)
        logits[c] = channel
    logits.flush()
    configuration = {
        "data_identifier": "bench", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [64, 64, 64], "median_image_size_in_voxels": list(shape), "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {}, "batch_dice": True,
    }
    plans = {"dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans",
             "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": list(shape),
             "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {}, "configurations": {"3d_fullres": configuration}}
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{f"c{i}": i for i in range(1, num_classes)}},
               "numTraining": 1, "file_ending": ".nii.gz"}
    spacing = [1.0] + [g / s for g, s in zip(grid[1:], shape[1:])]
    image.SetSpacing(spacing[::-1])
    sitk.WriteImage(image, str(folder / "gt" / "case.nii.gz"))
    properties = {"spacing": spacing, "shape_before_cropping": list(shape),
                  "bbox_used_for_cropping": [[0, s] for s in shape], "shape_after_cropping_and_before_resampling": list(shape),
                  "sitk_stuff": {"spacing": image.GetSpacing(), "origin": image.GetOrigin(), "direction": image.GetDirection()}}
    for name, value in (("plans", plans), ("dataset", dataset), ("properties", properties)):
        (folder / f"{name}.json").write_text(json.dumps(value))


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_route(folder: Path, route: str, out: Path) -> dict:
    """One export in this process (started fresh by :func:`measure`)."""
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mbls.calibration.case_statistics import StatisticsSettings
    from nnunet_mbls.calibration.evaluation.export import StatisticsExport, export_with_statistics

    plans_manager = PlansManager(json.loads((folder / "plans.json").read_text()))
    configuration_manager = plans_manager.get_configuration("3d_fullres")
    dataset = json.loads((folder / "dataset.json").read_text())
    properties = json.loads((folder / "properties.json").read_text())
    properties["sitk_stuff"] = {k: tuple(v) for k, v in properties["sitk_stuff"].items()}
    logits = torch.from_numpy(np.load(folder / "logits.npy"))
    baseline = vm_hwm_mib()
    out.mkdir(parents=True, exist_ok=True)
    target = str(out / "case")
    start = time.perf_counter()
    if route == "ours":
        job = StatisticsExport(StatisticsSettings(num_classes=len(dataset["labels"])), str(folder / "gt"),
                               str(out / "validation_statistics"), "bench")
        export_with_statistics(job, logits, properties, configuration_manager, plans_manager, dataset, target)
    else:
        export_prediction_from_logits(logits, properties, configuration_manager, plans_manager, dataset, target,
                                      save_probabilities=route == "npz")
    seconds = time.perf_counter() - start
    peak = vm_hwm_mib()
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    # what each later reader of the case pays (the calibration step, calibrate -f, benchmark --collect): the
    # probabilities decompressed, or the statistics read and the metrics after a T computed from them
    start = time.perf_counter()
    if route == "npz":
        np.load(target + ".npz")["probabilities"]
    elif route == "ours":
        from nnunet_mbls.calibration.after_temperature import accumulator_after
        from nnunet_mbls.calibration.case_statistics import CaseStatistics

        statistics = CaseStatistics.load(out / "validation_statistics" / "case.npz")
        accumulator_after(statistics, 1.3).compute()
    read = time.perf_counter() - start if route != "stock" else 0.0
    return {"seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": baseline, "bytes_written": written,
            "read_seconds": read}


def estimator_errors(folder: Path, out: Path) -> dict:
    """|estimated - exact| of every metric after T, for the statistics written by the ``ours`` route."""
    import torch

    from nnunet_mbls.calibration.after_temperature import accumulator_after, is_exact
    from nnunet_mbls.calibration.case_statistics import CaseStatistics
    from nnunet_mbls.calibration.metrics import CalibrationAccumulator
    from nnunet_mbls.calibration.regions import region_mask
    import SimpleITK as sitk

    statistics = CaseStatistics.load(out / "validation_statistics" / "case.npz")
    logits = torch.from_numpy(np.load(folder / "logits.npy", mmap_mode="r")[:])
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "gt" / "case.nii.gz"))).astype(np.int64)
    mask = torch.from_numpy(region_mask(ref, statistics.settings.region))
    selected, target = logits[:, mask], torch.from_numpy(ref)[mask]
    result = {"exact": is_exact(statistics), "voxels": int(target.numel()),
              "sample": int(statistics.metric.target.size), "errors": {}}
    for temperature in TEMPERATURES:
        exact = CalibrationAccumulator(statistics.settings.num_classes)
        exact.update(torch.softmax(selected / temperature, dim=0), target)
        truth, estimate = exact.compute(), accumulator_after(statistics, temperature).compute()
        result["errors"][str(temperature)] = {k: abs(estimate[k] - truth[k]) for k in ("ece", "cece", "nll", "brier",
                                                                                        "mce", "ece_adaptive")}
        result["errors"][str(temperature)]["ece_exact"] = truth["ece"]
    return result


def measure(folder: Path, route: str) -> dict:
    """Run one route in a fresh interpreter; its JSON result."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-{route}-", dir=folder))
    try:
        code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"from bench_calibration_step import run_route, estimator_errors; from pathlib import Path; "
                f"r = run_route(Path({str(folder)!r}), {'ours' if route == 'estimator' else route!r}, Path({str(out)!r})); "
                + ("r['estimator'] = estimator_errors(Path(%r), Path(%r)); " % (str(folder), str(out)) if route == "estimator" else "")
                + "print('RESULT' + json.dumps(r))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"route {route} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.split("RESULT", 1)[1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["amos", "totalseg"])
    parser.add_argument("--quick", action="store_true", help="the CI-sized case only, one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="runs of stock and ours (interleaved); npz runs once")
    parser.add_argument("--estimator", action="store_true", help="also measure the error of the metrics after T")
    parser.add_argument("--work", default=None, help="folder for the generated cases (default: a temporary one)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    sizes, repeats = (["quick"], 1) if args.quick else (args.sizes, args.repeats)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-calibration-step-"))
    results = {"machine": machine_info(), "command": " ".join(sys.argv), "sizes": {}}
    rows = []
    for size in sizes:
        num_classes, shape, network = SIZES[size]
        folder = work / size
        if not (folder / "logits.npy").is_file():
            make_case(folder, num_classes, shape, network)
        runs = {route: [] for route in ROUTES}
        for _ in range(repeats):
            for route in ("stock", "ours"):
                runs[route].append(measure(folder, route))
        runs["npz"].append(measure(folder, "npz"))
        summary = {route: {"seconds": statistics.median(r["seconds"] for r in rs),
                           "read_seconds": statistics.median(r["read_seconds"] for r in rs),
                           "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                           "rss_before_mib": statistics.median(r["rss_before_mib"] for r in rs),
                           "bytes_written": rs[0]["bytes_written"], "runs": rs} for route, rs in runs.items()}
        entry = {"classes": num_classes, "shape": list(shape), "routes": summary,
                 "ratio_ours_stock": summary["ours"]["seconds"] / summary["stock"]["seconds"],
                 "ratio_npz_stock": summary["npz"]["seconds"] / summary["stock"]["seconds"],
                 "peak_ratio_ours_stock": summary["ours"]["peak_rss_mib"] / summary["stock"]["peak_rss_mib"],
                 "extra_disk_mb_per_case": (summary["ours"]["bytes_written"] - summary["stock"]["bytes_written"]) / 1e6}
        if args.estimator and network is None:  # the exact values need the logits on the image grid
            entry["estimator"] = measure(folder, "estimator")["estimator"]
        results["sizes"][size] = entry
        for route in ROUTES:
            s = summary[route]
            rows.append([size, f"{num_classes} x {'x'.join(map(str, shape))}", route, f"{s['seconds']:.2f}",
                         f"{s['seconds'] / summary['stock']['seconds']:.2f}", f"{s['peak_rss_mib']:.0f}",
                         f"{s['peak_rss_mib'] / summary['stock']['peak_rss_mib']:.3f}", f"{s['bytes_written'] / 1e6:.2f}",
                         f"{s['read_seconds']:.2f}" if route != "stock" else "–"])
    print(markdown_table(["size", "classes x voxels", "route", "export s (median)", "/ stock", "peak RSS MiB", "/ stock",
                          "MB written", "read back s"], rows))
    for size, entry in results["sizes"].items():
        if "estimator" in entry:
            worst = {k: max(e[k] for e in entry["estimator"]["errors"].values()) for k in ("ece", "cece", "nll", "brier")}
            print(f"{size}: metrics after T estimated from {entry['estimator']['sample']} of "
                  f"{entry['estimator']['voxels']} voxels; worst |error| over T in {TEMPERATURES}: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    save_json(args.out, results)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    last = results["sizes"][sizes[-1]]
    print(f"ratio={last['ratio_ours_stock']:.3f} extra_disk_mb_per_case={last['extra_disk_mb_per_case']:.3f}")


if __name__ == "__main__":
    main()

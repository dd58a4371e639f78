"""``nnunet-mbls predict`` against ``nnUNetv2_predict`` on the same input, folds and device.

Setup: a generated 3D dataset (``--cases`` training cases of ``--shape``), planned by nnU-Net, and ``--folds``
fold models. The folds are randomly initialised nnU-Net networks saved as checkpoint_final.pth by nnU-Net's
own trainer (``initialize()`` + ``save_checkpoint``): prediction cost does not depend on the weights, and
this avoids minutes of CPU training. Then, alternating and in fresh processes (``/usr/bin/time -f %e %M``:
wall seconds and peak resident memory), for ``--rounds`` rounds:

- ``nnUNetv2_predict -f F...``                          (the anchor: segmentation only)
- ``nnUNetv2_predict -f F... --save_probabilities``       (nnU-Net's own probability export, .npz)
- ``nnunet-mbls predict -f F...``                        (segmentation + QC table)
- ``nnunet-mbls predict -f F... --maps <all four>``       (segmentation + QC + every map)

Medians and ratios to the anchor are printed; targets: ≤ 1.10× for segmentation + QC, ≤ 1.30× with every
map. Both tools run sequentially in one process (``-npp 0 [-nps 0]``) so that the comparison is like for like.

    python benchmarks/bench_predict.py --out /tmp/bench_predict            # defaults below
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_average, machine_info, markdown_table, median, save_json  # noqa: E402

MAPS = ["probabilities", "confidence", "entropy", "mutual_information"]
DATASET_ID = 996


def setup(root: Path, cases: int, shape: list[int], folds: int, configuration: str) -> dict[str, str]:
    """Dataset, nnU-Net planning, and ``folds`` untrained fold models of stock nnUNetTrainer."""
    from nnunet_mbls.data.synthetic import make_synthetic_dataset
    from nnunet_mbls.paths import env_with_ext_trainers

    env = env_with_ext_trainers(dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
                                     nnUNet_results=str(root / "results"), nnUNet_def_n_proc="1", nnUNet_compile="f"))
    os.environ.update(env)
    folder = make_synthetic_dataset(root / "raw", dataset_id=DATASET_ID, name="BenchPredict", num_cases=cases,
                                    shape=tuple(shape), seed=0)
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", configuration,
                    "-np", "1", "-npfp", "1"], env=env, check=True, capture_output=True)
    code = f"""
import torch, json
from pathlib import Path
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
pre = Path({str(root / 'pre' / folder.name)!r})
plans = dict(json.loads((pre / 'nnUNetPlans.json').read_text()), continue_training=False); dataset_json = json.loads((pre / 'dataset.json').read_text())
for fold in range({folds}):
    torch.manual_seed(fold)
    t = nnUNetTrainer(dict(plans), {configuration!r}, fold, dataset_json, device=torch.device('cpu'))
    t.initialize()
    t.save_checkpoint(str(Path(t.output_folder) / 'checkpoint_final.pth'))
    # what nnU-Net's on_train_start writes for inference
    (Path(t.output_folder_base) / 'plans.json').write_text(json.dumps(t.plans_manager.plans))
    (Path(t.output_folder_base) / 'dataset.json').write_text(json.dumps(dataset_json))
"""
    subprocess.run([sys.executable, "-c", code], env=dict(env, nnUNet_n_proc_DA="0"), check=True, capture_output=True)
    images = root / "images"
    images.mkdir()
    for image in (folder / "imagesTr").iterdir():
        (images / image.name).symlink_to(image)
    return env


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh process, by GNU time."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *command], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    wall, rss_kib = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), float(rss_kib) / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6, help="cases to predict (default 6)")
    parser.add_argument("--shape", type=int, nargs="+", default=[48, 96, 96], help="case shape (default 48 96 96)")
    parser.add_argument("--folds", type=int, default=2, help="fold models of the ensemble (default 2)")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("-device", default="cpu")
    parser.add_argument("--out", help="folder for bench_predict.json (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        env = setup(root, args.cases, args.shape, args.folds, args.configuration)
        bin_dir = Path(sys.executable).parent
        folds = [str(f) for f in range(args.folds)]
        common = ["-i", str(root / "images"), "-d", str(DATASET_ID), "-c", args.configuration, "-f", *folds,
                  "-device", args.device]
        commands = {
            "nnUNetv2_predict": [str(bin_dir / "nnUNetv2_predict"), *common, "-npp", "0", "-nps", "0"],
            "nnUNetv2_predict --save_probabilities": [str(bin_dir / "nnUNetv2_predict"), *common, "-npp", "0", "-nps", "0",
                                                      "--save_probabilities"],
            "nnunet-mbls predict (segmentation + QC)": [str(bin_dir / "nnunet-mbls"), "predict", *common, "-npp", "0"],
            "nnunet-mbls predict --maps (all four)": [str(bin_dir / "nnunet-mbls"), "predict", *common, "-npp", "0",
                                                      "--maps", *MAPS],
        }
        results = {name: {"wall_s": [], "peak_rss_mib": []} for name in commands}
        for r in range(args.rounds):
            for name, command in commands.items():
                out = root / f"out_{r}_{len(results[name]['wall_s'])}_{abs(hash(name))}"
                wall, rss = timed([*command, "-o", str(out)], env)
                results[name]["wall_s"].append(wall)
                results[name]["peak_rss_mib"].append(rss)
                shutil.rmtree(out, ignore_errors=True)
        anchor = results["nnUNetv2_predict"]
        rows, summary = [], {}
        for name, values in results.items():
            wall, rss = median(values["wall_s"]), median(values["peak_rss_mib"])
            summary[name] = {"median_wall_s": wall, "median_peak_rss_mib": rss,
                             "time_ratio": wall / median(anchor["wall_s"]),
                             "memory_ratio": rss / median(anchor["peak_rss_mib"]), **values}
            target = {"nnunet-mbls predict (segmentation + QC)": "<= 1.10x",
                      "nnunet-mbls predict --maps (all four)": "<= 1.30x"}.get(name, "")
            rows.append([name, f"{wall:.2f}", f"{summary[name]['time_ratio']:.3f}x", f"{rss:.0f}",
                         f"{summary[name]['memory_ratio']:.3f}x", target])
        print(markdown_table(["command", "median wall (s)", "time / nnUNetv2_predict", "median peak RSS (MiB)",
                              "memory / nnUNetv2_predict", "target"], rows))
        payload = {"machine": machine_info(), "loadavg_end": load_average(), "settings": vars(args),
                   "command": " ".join(sys.argv), "results": summary}
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            save_json(str(Path(args.out) / "bench_predict.json"), payload)
        return payload
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

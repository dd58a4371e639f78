"""What a temperature fit on trained folds records: the fit with its metrics, calibration.json's fields,
the per-case evaluations and the reliability diagram."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...defaults import FIT_REGION_REASON, FIT_REGION_VOXELS, T_BOUNDS
from ...io import atomic_write_json
from ..reliability import plot_reliability


def metric_summary(evaluation: dict) -> dict:
    """The part of an evaluation that calibration.json keeps: means over cases and pooled values."""
    return {"mean": evaluation["mean"], "pooled": evaluation["pooled"]}


@dataclass
class TemperatureFit:
    """One temperature fitted on the validation probabilities of one or several folders, with the metrics."""

    temperature: float
    subsample_size: int
    before: dict
    after: dict

    @property
    def at_bound(self) -> str | None:
        return "lower" if self.temperature <= T_BOUNDS[0] else "upper" if self.temperature >= T_BOUNDS[1] else None


def write_fit_details(details: Path, fit: TemperatureFit, title: str) -> None:
    """``evaluation_before.json``, ``evaluation_after.json`` and ``reliability.png`` (before vs after)."""
    atomic_write_json(details / "evaluation_before.json", fit.before)
    atomic_write_json(details / "evaluation_after.json", fit.after)
    plot_reliability(
        {
            f"before (ECE {fit.before['mean']['ece']:.4f})": fit.before["reliability"],
            f"after T={fit.temperature:.3f} (ECE {fit.after['mean']['ece']:.4f})": fit.after["reliability"],
        },
        details / "reliability.png",
        title=title,
    )


def fit_record(fit: TemperatureFit, region: str, fit_region: str, max_voxels: int, seed: int, voxels_of: str) -> dict:
    """What calibration.json and calibration_ensemble.json say about a fit."""
    return {
        "temperature": fit.temperature,
        "temperature_bounds": list(T_BOUNDS),
        "temperature_at_bound": fit.at_bound,
        "fit": {
            "objective": "mean NLL of softmax(log p / T)",
            "fit_region": fit_region,
            "fit_region_default": FIT_REGION_REASON,
            "voxels": f"uniform subsample of the {FIT_REGION_VOXELS[fit_region]} of {voxels_of}, ignore label excluded",
            "sampling": "the max_voxels smallest of uniform keys drawn per case from a generator seeded by (seed, case "
                        "name): the same for any number of worker processes",
            "subsample_size": fit.subsample_size,
            "max_voxels": max_voxels,
            "seed": seed,
        },
        "metric_region": region,
        "num_cases": fit.before["num_cases"],
        "before": metric_summary(fit.before),
        "after": metric_summary(fit.after),
    }


def log_fit(log: Callable[..., None], what: str, fit: TemperatureFit, region: str) -> None:
    log(f"nnunet-mbls calibration ({what}): T = {fit.temperature:.4f}; {region} ECE {fit.before['mean']['ece']:.4f} -> "
        f"{fit.after['mean']['ece']:.4f}, NLL {fit.before['mean']['nll']:.4f} -> {fit.after['mean']['nll']:.4f}")
    if fit.at_bound:
        log(
            f"nnunet-mbls calibration: T hit the {fit.at_bound} bound {fit.temperature:g} of {list(T_BOUNDS)}: "
            + ("nearly every validation voxel is already right, so the NLL keeps falling as T shrinks"
               if fit.at_bound == "lower" else "the validation predictions are mostly wrong, so the NLL prefers uniform probabilities")
            + "; the fit carries little information (a tiny or degenerate validation set?)"
        )

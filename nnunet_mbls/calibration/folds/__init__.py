"""Calibration of trained nnU-Net folds (as nnU-Net's ``run/`` beside ``training/``): the calibration step of one
fold, one calibration shared by an ensemble's folds (out-of-fold or on a calibration set), vector scaling, and
whether a fold is calibrated. The maths these call on arrays live one level up, in :mod:`nnunet_mbls.calibration`.
"""

from .ensemble import calibrate_ensemble, calibrate_on_calibration_set, finish_shared_temperature
from .records import TemperatureFit, fit_record, log_fit, metric_summary, write_fit_details
from .state import calibration_problem, ensemble_problem, folded_map, recorded_map
from .step import (CalibrationStepError, calibrate_output_folder, check_validation_complete, fit_temperature_on,
                   gt_folder_for, plans_of, source_of, validation_cases_of_fold, write_calibrated_checkpoint)
from .trained import calibrate_trained_model, prepare_fold_for_calibration
from .validation import run_streamed_validation, statistics_export
from .vector_scaling import calibrate_vector, fall_back_to_temperature, sample_rows, validation_logits

__all__ = [
    "CalibrationStepError", "TemperatureFit", "calibrate_ensemble", "calibrate_on_calibration_set",
    "calibrate_output_folder", "calibrate_trained_model", "calibrate_vector", "calibration_problem",
    "check_validation_complete", "ensemble_problem", "fall_back_to_temperature", "finish_shared_temperature",
    "fit_record", "fit_temperature_on", "folded_map", "gt_folder_for", "log_fit", "metric_summary", "plans_of",
    "prepare_fold_for_calibration", "recorded_map", "run_streamed_validation", "sample_rows", "source_of", "statistics_export",
    "validation_cases_of_fold", "validation_logits", "write_calibrated_checkpoint", "write_fit_details",
]

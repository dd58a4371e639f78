"""``nnunet-mbls conformal``: masks, volume intervals and a case-acceptance rule with finite-sample guarantees."""

from __future__ import annotations

import argparse

from .options import STEP_SIZE, STOCK_PLANS, STOCK_TRAINER, add_device_option, add_sliding_window_options, add_temperature_options


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "conformal", help="conformal risk control on labelled held-out cases: FNR/FDR masks, volume intervals and an "
                          "acceptance rule with finite-sample guarantees (conformal.json)")
    where = p.add_argument_group("cases: a nnUNetv2_predict --save_probabilities folder with references")
    where.add_argument("-ref", help="reference segmentations")
    where.add_argument("-pred", help="nnUNetv2_predict --save_probabilities output (.npz, .pkl, dataset.json)")
    add_temperature_options(where, required=False, t_help="apply temperature T first: normalize(p ** (1/T))")
    where.add_argument("--chill", action="store_true", help="skip references without probabilities")
    trained = p.add_argument_group("or: trained folds (their out-of-fold validation cases, or --calibration-set)")
    trained.add_argument("-d", help="dataset name or id")
    trained.add_argument("-c", help="configuration, e.g. 3d_fullres")
    trained.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    trained.add_argument("-tr", default=STOCK_TRAINER, help=f"trainer (default {STOCK_TRAINER})")
    trained.add_argument("-p", default=STOCK_PLANS, help=f"plans identifier (default {STOCK_PLANS})")
    trained.add_argument("--calibration-set", nargs=2, metavar=("IMAGES", "LABELS"),
                         help="held-out labelled cases predicted by the folds' ensemble (the exact route)")
    trained.add_argument("--as-trained", action="store_true",
                         help="use the folds' probabilities as trained, not after their temperature")
    add_device_option(trained)
    add_sliding_window_options(trained, step_help=f"--calibration-set: sliding-window step (default {STEP_SIZE})",
                               tta_help="--calibration-set: predict without mirroring, as deployed")
    p.add_argument("-o", help="conformal.json to write (required with -ref/-pred; default with -d: "
                              "<trainer folder>/conformal.json)")
    p.add_argument("--risk", nargs="+", choices=["fnr", "fdr", "volume"], default=["fnr", "fdr", "volume"],
                   help="fnr: superset mask missing at most alpha of the structure on average; fdr: subset mask with "
                        "at most alpha outside it on average; volume: interval holding the true volume with "
                        "probability 1 - alpha (default: all three)")
    p.add_argument("--alpha", type=float, default=0.1, help="risk level / miscoverage in (0, 1) (default 0.1)")
    p.add_argument("--labels", nargs="+", metavar="NAME", help="label names to calibrate (default: every foreground label)")
    p.add_argument("--accept-score", default="mean_entropy_fg", choices=["mean_entropy_fg", "mean_entropy_boundary"],
                   help="QC score of the acceptance rule (default mean_entropy_fg)")
    p.add_argument("--failure-dice", type=float, default=0.5,
                   help="a case fails when its mean foreground Dice is below this (default 0.5)")
    p.add_argument("--max-failure-rate", type=float, default=0.1,
                   help="r: failure rate allowed among accepted cases (default 0.1)")
    p.add_argument("--delta", type=float, default=0.1, help="the acceptance guarantee holds with probability 1 - delta (default 0.1)")
    p.add_argument("--no-acceptance", action="store_true", help="fit no acceptance rule")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration.conformal.risk import check_alpha
    from ..conformal.record import AcceptanceSettings, summary_lines

    check_alpha(args.alpha)
    folders, model = args.ref is not None or args.pred is not None, args.d is not None or args.c is not None
    if folders == model:
        raise ValueError("pass either -ref REF -pred PRED (a predicted folder) or -d D -c C (trained folds)")
    acceptance = None if args.no_acceptance else AcceptanceSettings(args.accept_score, args.failure_dice,
                                                                    args.max_failure_rate, args.delta)
    if folders:
        from ..conformal.folder import conformal_from_folders

        if not (args.ref and args.pred and args.o):
            raise ValueError("-ref, -pred and -o go together: nnunet-mbls conformal -ref GT -pred PRED -o conformal.json")
        record = conformal_from_folders(args.ref, args.pred, args.o, args.risk, args.alpha, args.labels, acceptance,
                                        args.t, args.calibration_json, args.chill)
        out = args.o
    else:
        from ..conformal.trained import conformal_on_folds

        if not (args.d and args.c):
            raise ValueError("-d and -c go together: nnunet-mbls conformal -d D -c C -f 0 1 2 3 4 -tr TRAINER")
        record = conformal_on_folds(args.d, args.c, args.f, args.tr, args.p, args.o, args.risk, args.alpha, args.labels,
                                    acceptance, args.device, args.calibration_set, args.step_size, args.disable_tta,
                                    args.as_trained)
        out = record["output_file"]
    print("\n".join(summary_lines(record)))
    print(f"wrote {out}; apply it with nnunet-mbls predict/maps --conformal-json {out}")
    return 0

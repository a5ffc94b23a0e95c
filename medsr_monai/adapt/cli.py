"""``medsr adapt``: scan-specific self-supervised adaptation of a bundle's model, then its inference."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _cmd_adapt(args: argparse.Namespace) -> int:
    from medsr_monai.adapt import adapt_scan

    from medsr_monai.tuning.cli import parse_set

    overrides = parse_set(args.override)
    done = adapt_scan(args.bundle, args.input, seconds=args.seconds, output_dir=args.output_dir, config=args.config,
                      from_scratch=args.from_scratch, overrides=overrides, tracking_uri=args.tracking_uri,
                      seed=args.seed, max_steps=args.max_steps, learning_rate=args.learning_rate,
                      infer=not args.no_inference, overwrite=args.overwrite,
                      allow_large_scale=args.allow_large_scale)
    r = done.result
    verdict = ("kept the adapted weights" if r.kept else
               "kept the original weights (adaptation did not improve the kept-back slices)")
    print(f"adaptation: {r.steps} steps in {r.seconds:.0f} s ({r.stopped}); self-supervised validation loss "
          f"{r.val_before:.5g} -> {r.val_after:.5g}: {verdict}")
    print(f"weights: {done.weights}\nsidecar: {done.sidecar}\nMLflow run: {done.run_id}")
    for out in done.outputs:
        print(f"output: {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "adapt", help="fine-tune a copy of a bundle's model on the scan itself (self-supervised), then run inference",
        description="Scan-specific self-supervised adaptation: pairs are made from the input scan alone with the "
        "bundle's own physics (in-plane SR: the scan's slices degraded once more, ZSSR; CT denoising: "
        "neighbouring-pixel sub-samples, Neighbor2Neighbor); a copy of the model is fine-tuned for a time budget "
        "and kept only when a few kept-back slices of the scan say it improved; then the bundle's inference runs "
        "with it. The bundle's models/ is never written; the adapted weights and a JSON sidecar go next to the "
        "output, and an MLflow run (experiment adapt-<bundle>) records the figures.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/edsr")
    p.add_argument("--input", required=True, help="the scan: NIfTI / NRRD file or DICOM series folder")
    p.add_argument("--seconds", type=float, default=180.0, help="adaptation budget in seconds (default: %(default)s)")
    p.add_argument("--output_dir", "--output-dir", default=None,
                   help="where the output, <scan>_adapted.pt and .json go (default: <bundle>/eval/adapt)")
    p.add_argument("--config", default="inference", help="the bundle's inference config to adapt, e.g. "
                   "inference_ct_denoise for the unet bundle's CT denoising (default: %(default)s)")
    p.add_argument("--from-scratch", action="store_true", help="adapt a freshly initialised model (it starts at the "
                   "physics baseline) instead of the bundle's shipped weights")
    p.add_argument("--set", dest="override", action="append", metavar="KEY=VALUE",
                   help="config override (repeatable), e.g. --set scale=4")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI, else the project "
                   "store)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair sampling (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: the budget)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="Adam step size (default: 1e-4 from the shipped weights, 1e-3 for through-plane SR and "
                        "from scratch)")
    p.add_argument("--allow-large-scale", action="store_true",
                   help="adapt in-plane SR above x2 anyway (refused by default: at x4 the scan's own pairs are a "
                   "quarter of the inference scale, adaptation measured harmful and the guard cannot see it)")
    p.add_argument("--no-inference", action="store_true", help="adapt and save the weights only")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier adaptation of this "
                   "scan in --output_dir (default: refuse)")
    p.set_defaults(func=_cmd_adapt)

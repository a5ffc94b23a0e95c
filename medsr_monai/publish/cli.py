"""``medsr publish`` and ``medsr fetch-bundle``.

Usage::

    medsr publish bundles/edsr [--out dist/] [--run-id RUN] [--sample scan.nii.gz] [--allow-no-provenance]
    medsr fetch-bundle dist/edsr_0.1.0.zip --to downloaded/     # -> downloaded/edsr/

``publish`` refuses weights whose training run cannot be found in the MLflow store (nor in the provenance sidecar
shipped next to them, ``models/model.provenance.json``) unless
``--allow-no-provenance`` is given: a published model that nobody can trace back to its data and code is
the failure this command exists to prevent. With the flag, the manifest says ``"provenance": "unknown"``
and a warning is printed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from medsr_monai.paths import add_path_arguments, bundle_arg, project_dir

from .checks import PublishError


def default_sample(project: str | os.PathLike | None = None, bundle: str | os.PathLike | None = None) -> Path:
    """The real scan used for the TorchScript check when neither ``--sample`` nor the inference config's input is
    there: ``<project>/data/samples/nifti/brain2.nii.gz``, the project being ``--project-dir``, else the one the
    bundle sits in, else the working directory (see :func:`medsr_monai.paths.project_dir`)."""
    return project_dir(project, bundle_root=bundle) / "data" / "samples" / "nifti" / "brain2.nii.gz"


def register(sub) -> None:
    """Add the ``publish`` and ``fetch-bundle`` subcommands to the ``medsr`` parser's subparsers."""
    p = sub.add_parser("publish", help="check a bundle offline (model-zoo rules) and write dist/<name>_<version>.zip",
                       description="Offline model-zoo checks (required files, metadata against the local schema, "
                       "a new version with a changelog entry, verify_net_in_out, TorchScript export matching the "
                       "eager model on a real slice), then dist/<name>_<version>.zip with a sha256 manifest and the "
                       "training run's provenance. Weights with no matching FINISHED MLflow run are refused "
                       "unless --allow-no-provenance.")
    p.add_argument("bundle", help="bundle folder, e.g. bundles/edsr, or a bundle name found in the bundles "
                   "folder, e.g. edsr")
    p.add_argument("--out", type=Path, default=Path("dist"), help="where archives are written (default: dist/)")
    p.add_argument("--run-id", default=None, help="MLflow run that trained models/model.pt (default: found by "
                   "matching the sha256 of models/model.pt against FINISHED runs' model.pt artifacts)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI, else the "
                   "project store <project>/mlruns)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the experiment_name of the bundle's train.json, "
                   "e.g. unet_mri_recon)")
    p.add_argument("--sample", type=Path, default=None, help="real NIfTI for the TorchScript-vs-eager check "
                   "(default: the inference config's input, else <project>/data/samples/nifti/brain2.nii.gz)")
    p.add_argument("--allow-no-provenance", action="store_true",
                   help="publish with provenance 'unknown' when no training run matches (default: refuse)")
    add_path_arguments(p)
    p.set_defaults(func=cmd_publish)

    f = sub.add_parser("fetch-bundle", help="verify a published bundle's checksums and unpack it to DIR/<name>")
    f.add_argument("source", type=Path, help="archive (.zip) written by medsr publish, or an unpacked bundle folder")
    f.add_argument("--to", type=Path, required=True, help="folder to unpack into (the bundle lands in DIR/<name>)")
    f.set_defaults(func=cmd_fetch)


def _error(cmd: str, msg: str) -> int:
    sys.stdout.flush()  # the error is the last line the user sees
    print(f"medsr {cmd}: error: {msg}", file=sys.stderr)
    return 2


def _tracking_uri(bundle: Path, explicit: str | None, project: str | os.PathLike | None = None) -> str | None:
    """The store to search, without creating one as a side effect."""
    from medsr_monai.tracking.store import project_root, resolve_tracking_uri

    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if (project_root(bundle, project) / "mlruns" / "mlflow.db").is_file():
        return resolve_tracking_uri(bundle, check=False, project=project)
    return None


def _default_sample(bundle: Path, project: str | os.PathLike | None = None) -> Path:
    try:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["bundle_root"] = str(bundle)
        candidate = Path(str(parser.get_parsed_content("input")))
        if candidate.is_file():
            return candidate
    except Exception:  # the config's input may need things that do not exist here; fall back
        pass
    fallback = default_sample(project, bundle)
    if fallback.is_file():
        return fallback
    raise PublishError(f"no real NIfTI for the TorchScript check: pass --sample (tried {bundle}'s inference "
                       f"input and {fallback})")


def _train_experiment(bundle: Path) -> str:
    """The MLflow experiment the bundle's train.json records into (e.g. ``unet_mri_recon``), else its folder name."""
    try:
        from medsr_monai.tuning.trial import bundle_parser

        return str(bundle_parser(bundle).get_parsed_content("experiment_name"))
    except Exception:  # noqa: BLE001 - a bundle without train.json / experiment_name: the folder name
        return bundle.name


def publish(bundle: Path, out: Path, run_id: str | None = None, tracking_uri: str | None = None,
            experiment: str | None = None, sample: Path | None = None, allow_no_provenance: bool = False,
            log=print, project: str | os.PathLike | None = None) -> Path:
    """All checks, then the archive. Raises :class:`PublishError` on the first failed check.

    ``project`` is ``--project-dir`` (see :mod:`medsr_monai.paths`): the MLflow store searched by default and the
    default sample scan are in it.

    Returns:
        the archive path.
    """
    from .archive import write_archive
    from .checks import check_metadata, check_network, check_required_files, check_version
    from .provenance import find_provenance, read_sidecar

    bundle = Path(bundle).resolve()
    if not bundle.is_dir():
        raise PublishError(f"{bundle}: not a bundle folder")
    name = bundle.name
    check_required_files(bundle)
    meta = check_metadata(bundle)
    version = check_version(meta, Path(out), name, bundle / "configs" / "metadata.json")
    log(f"{name} {version}: required files present, metadata valid, version new")

    uri = _tracking_uri(bundle, tracking_uri, project)
    experiment = experiment or _train_experiment(bundle)
    weights = bundle / "models" / "model.pt"
    prov = find_provenance(weights, experiment, uri, run_id) if uri else None
    if prov is None and run_id is None:
        prov = read_sidecar(weights)  # shipped weights on a fresh clone: the run's record travels with them
    if prov is None:
        where = f"in experiment {experiment!r} of {uri}" if uri else "(no MLflow store found)"
        msg = f"no FINISHED training run with this models/model.pt {where}, and no models/model.provenance.json"
        if not allow_no_provenance:
            raise PublishError(f"{msg}; pass --run-id, --tracking-uri, or --allow-no-provenance")
        print(f"WARNING: {msg}: PUBLISHING WITH PROVENANCE 'unknown'", file=sys.stderr)
        prov = "unknown"
    else:
        log(f"provenance: run {prov['run_id']} ({prov['run_name']})"
            + (f", from the {prov['source']}" if prov.get("source") else ""))

    sample = Path(sample) if sample else _default_sample(bundle, project)
    if not sample.is_file():
        raise PublishError(f"--sample {sample}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        diff = check_network(bundle, sample, Path(tmp) / "model.ts")
    log(f"verify_net_in_out ok; TorchScript export matches eager (max |diff| {diff:.2g}) on {sample.name}")
    dest = write_archive(bundle, name, version, Path(out), prov)
    log(f"wrote {dest}")
    return dest


def cmd_publish(args) -> int:
    try:
        bundle = bundle_arg(args.bundle, args.bundles_dir, args.project_dir)
        publish(bundle, args.out, args.run_id, args.tracking_uri, args.experiment, args.sample,
                args.allow_no_provenance, project=args.project_dir)
    except (PublishError, FileNotFoundError) as e:
        return _error("publish", str(e))
    return 0


def cmd_fetch(args) -> int:
    from .fetch import fetch_bundle

    try:
        dest = fetch_bundle(args.source, args.to)
    except PublishError as e:
        return _error("fetch-bundle", str(e))
    print(f"verified and unpacked to {dest}")
    return 0

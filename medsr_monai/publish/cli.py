"""``medsr publish`` and ``medsr fetch-bundle``.

Usage::

    medsr publish bundles/edsr [--out dist/] [--run-id RUN] [--sample scan.nii.gz] [--allow-no-provenance]
    medsr publish --model models:/edsr-x2@champion [--tracking-uri URI]   # from the MLflow Model Registry
    medsr keygen ~/.medsr/publisher.key                         # once: key + key.pub (give .pub to collaborators)
    medsr publish bundles/edsr --sign-key ~/.medsr/publisher.key  # prints the sha256, writes <archive>.sig
    medsr fetch-bundle dist/edsr_0.1.0.zip --to downloaded/ --sha256 <printed sha256>     # -> downloaded/edsr/
    medsr fetch-bundle dist/edsr_0.1.0.zip --to downloaded/ --public-key publisher.key.pub

``fetch-bundle`` refuses an archive that is neither pinned by ``--sha256`` nor signed by a trusted
``--public-key`` (``--trust-unverified`` overrides, with a loud warning): a bundle's configs are code.

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
    p.add_argument("bundle", nargs="?", default=None, help="bundle folder, e.g. bundles/edsr, or a bundle name "
                   "found in the bundles folder, e.g. edsr (or --model)")
    p.add_argument("--model", default=None, metavar="MODEL_URI", help="publish a model from the MLflow Model "
                   "Registry instead of a bundle folder, e.g. models:/edsr-x2@champion (or models:/edsr-x2/3): the "
                   "bundle's configs and trained weights logged with it, provenance from the run that trained it")
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
    p.add_argument("--sign-key", type=Path, default=None, help="Ed25519 private key (from `medsr keygen`): sign the "
                   "archive, writing <archive>.sig beside it")
    add_path_arguments(p)
    p.set_defaults(func=cmd_publish)

    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing published archives",
                       description="Writes KEY (private, mode 600: keep it) and KEY.pub (give it to collaborators, "
                       "who pass it to `medsr fetch-bundle --public-key`). Refuses to overwrite a key.")
    k.add_argument("key", type=Path, help="private key file to create, e.g. ~/.medsr/publisher.key")
    k.set_defaults(func=cmd_keygen)

    f = sub.add_parser("fetch-bundle", help="verify a published bundle (sha256 or signature, then checksums) and "
                       "unpack it to DIR/<name>",
                       description="Refuses an archive that is not pinned by --sha256 nor signed by a trusted "
                       "--public-key: a bundle's configs are code that monai.bundle run executes. Caps on entries, "
                       "sizes and compression ratio are checked before anything is extracted.")
    f.add_argument("source", type=Path, help="archive (.zip) written by medsr publish, or an unpacked bundle folder")
    f.add_argument("--to", type=Path, required=True, help="folder to unpack into (the bundle lands in DIR/<name>)")
    f.add_argument("--sha256", default=None, help="the archive's sha256 as `medsr publish` printed it")
    f.add_argument("--public-key", type=Path, default=None, help="the publisher's Ed25519 public key (.pub from "
                   "`medsr keygen`); the signature is --signature or <archive>.sig")
    f.add_argument("--signature", type=Path, default=None, help="signature file (default: <archive>.sig)")
    f.add_argument("--trust-unverified", action="store_true", help="unpack an archive nothing authenticates "
                   "(warned loudly; its configs run code)")
    f.add_argument("--max-unpacked-mb", type=float, default=None, help="cap on the total unpacked size "
                   "(default 2048 MiB), checked before extracting")
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
            log=print, project: str | os.PathLike | None = None, sign_key: Path | None = None) -> Path:
    """All checks, then the archive, its sha256 (logged: collaborators pass it to ``fetch-bundle --sha256``) and,
    with ``sign_key``, its signature ``<archive>.sig``. Raises :class:`PublishError` on the first failed check.

    ``project`` is ``--project-dir`` (see :mod:`medsr_monai.paths`): the MLflow store searched by default and the
    default sample scan are in it.

    Returns:
        the archive path.
    """
    from .archive import write_archive
    from .checks import check_metadata, check_network, check_required_files, check_version
    from .provenance import find_provenance, read_sidecar
    from .signing import _load_private, archive_sha256, sign_archive

    bundle = Path(bundle).resolve()
    if sign_key is not None:
        _load_private(Path(sign_key))  # a bad key is refused before the checks, not after the archive exists
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
    dest = write_archive(bundle, name, version, Path(out), prov, onnx_sample=sample, log=log)  # + models/*.onnx
    log(f"wrote {dest}")
    if sign_key is not None:
        log(f"signed: {sign_archive(dest, sign_key)}")
    log(f"sha256 {archive_sha256(dest)}  {dest.name}")
    return dest


def publish_registered(model_uri: str, out: Path, tracking_uri: str | None = None, sample: Path | None = None,
                       log=print, project: str | os.PathLike | None = None, sign_key: Path | None = None) -> Path:
    """:func:`publish` a model of the MLflow Model Registry (``models:/edsr-x2@champion``): the bundle folder logged
    inside the pyfunc model (configs, docs, the trained weights) is downloaded and published with the provenance of
    the run that trained it.

    Args:
        model_uri: ``models:/<name>@<alias>``, ``models:/<name>/<version>`` (or any model URI MLflow resolves).
        out: where the archive is written.
        tracking_uri: the store (default: ``MLFLOW_TRACKING_URI``, else the project store).
        sample: real NIfTI for the TorchScript check.
        log: progress printer.
        project: ``--project-dir``.
        sign_key: Ed25519 private key to sign the archive.

    Returns:
        the archive path.
    """
    import shutil

    from medsr_monai.tracking.models import download_registered_bundle
    from medsr_monai.tracking.store import resolve_tracking_uri

    uri = tracking_uri or resolve_tracking_uri(check=False, project=project)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            bundle, run_id = download_registered_bundle(model_uri, Path(tmp) / "download", uri)
        except Exception as e:  # noqa: BLE001 - unknown name/alias, unreachable store: one line naming the URI
            raise PublishError(f"--model {model_uri}: {type(e).__name__}: {e}") from e
        staged = Path(tmp) / "bundle" / bundle.name
        shutil.copytree(bundle, staged)
        (staged / "mlflow_settings.json").unlink(missing_ok=True)  # the pyfunc's own file, not the bundle's
        log(f"{model_uri}: bundle {bundle.name}, trained by run {run_id}")
        return publish(staged, out, run_id=run_id, tracking_uri=uri, sample=sample, log=log, project=project,
                       sign_key=sign_key)


def cmd_publish(args) -> int:
    if args.model:
        if args.bundle:
            return _error("publish", "give a bundle or --model, not both")
        try:
            publish_registered(args.model, args.out, args.tracking_uri, args.sample, project=args.project_dir,
                               sign_key=args.sign_key)
        except (PublishError, FileNotFoundError) as e:
            return _error("publish", str(e))
        return 0
    if not args.bundle:
        return _error("publish", "give a bundle folder or name, or --model models:/NAME@ALIAS")
    try:
        bundle = bundle_arg(args.bundle, args.bundles_dir, args.project_dir)
        publish(bundle, args.out, args.run_id, args.tracking_uri, args.experiment, args.sample,
                args.allow_no_provenance, project=args.project_dir, sign_key=args.sign_key)
    except (PublishError, FileNotFoundError) as e:
        return _error("publish", str(e))
    return 0


def cmd_keygen(args) -> int:
    from .signing import generate_key

    try:
        private, public = generate_key(args.key)
    except PublishError as e:
        return _error("keygen", str(e))
    print(f"private key {private} (keep it; sign with `medsr publish --sign-key {private}`)")
    print(f"public key  {public} (give it to collaborators: `medsr fetch-bundle --public-key {public.name}`)")
    return 0


def cmd_fetch(args) -> int:
    from .fetch import Limits, fetch_bundle

    limits = Limits() if args.max_unpacked_mb is None else Limits(max_total=int(args.max_unpacked_mb * 2**20))
    try:
        dest = fetch_bundle(args.source, args.to, sha256=args.sha256, public_key=args.public_key,
                            signature=args.signature, trust_unverified=args.trust_unverified, limits=limits)
    except PublishError as e:
        return _error("fetch-bundle", str(e))
    print(f"verified and unpacked to {dest}")
    return 0

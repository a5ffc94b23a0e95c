"""``medsr data ...`` commands: fetch the real sample scans, index a folder of scans.

Wire into the main parser with ``register(subparsers)``; each subcommand sets
``func`` (``args.func(args) -> int``). Standalone: ``python -m medsr_monai.data.cli``.
"""

from __future__ import annotations

import argparse
import sys

from .checks import VolumeError
from .datalist import DatalistError

__all__ = ["register", "main", "cmd_samples", "cmd_index"]

EXIT_OK = 0
EXIT_USER_ERROR = 2


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _fmt_spacing(sp) -> str:
    return "x".join(f"{v:.3g}" for v in sp)


def cmd_samples(args: argparse.Namespace) -> int:
    import json

    from .samples import fetch_samples

    try:
        out = fetch_samples(out_dir=args.out, cache_dir=args.cache, force=args.force, progress=True)
    except (VolumeError, DatalistError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RuntimeError as err:  # pip download failed, or a sha256 / geometry mismatch
        print(f"error: {err}", file=sys.stderr)
        return 1
    man = json.loads((out / "manifest.json").read_text())
    rows = [
        {
            "subject": e["subject"],
            "modality": e["modality"],
            "split": e["split"],
            "shape": "x".join(map(str, e["shape"])),
            "spacing_mm": _fmt_spacing(e["spacing"]),
            "source": f"{e['source']['package']} {e['source']['version']}",
        }
        for e in man["files"]
    ]
    print(_table(rows, ["subject", "modality", "split", "shape", "spacing_mm", "source"]))
    print(f"\nNIfTI files: {out / 'nifti'}\ndatalist:    {out / 'datalist.json'}\n"
          f"manifest:    {out / 'manifest.json'}\nlicences:    {out / 'data_license.txt'}")
    return EXIT_OK


def cmd_index(args: argparse.Namespace) -> int:
    from .index import index_folder

    try:
        res = index_folder(
            args.folder,
            out=args.out,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            modality=args.modality,
        )
    except (VolumeError, DatalistError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    rows = [
        {
            "subject": it["subject"],
            "modality": it["modality"] + (" (guessed)" if it["modality_guessed"] else ""),
            "split": it["split"],
            "shape": "x".join(map(str, it["shape"])),
            "spacing_mm": _fmt_spacing(it["spacing"]),
            "image": it["image"],
        }
        for it in sorted(res["items"], key=lambda x: (x["split"], x["subject"]))
    ]
    print(_table(rows, ["subject", "modality", "split", "shape", "spacing_mm", "image"]))
    counts = ", ".join(f"{k}: {len(v)} subject(s)" for k, v in res["splits"].items())
    print(f"\n{len(res['items'])} volume(s) accepted ({counts}); {len(res['rejected'])} rejected")
    for r in res["rejected"]:
        print(f"  rejected {r['path']}: {r['reason']}")
    print(f"datalist: {res['datalist']}\nmanifest: {res['manifest']}")
    return EXIT_OK


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``data`` command group (``samples``, ``index``) to an argparse subparsers object."""
    data = subparsers.add_parser(
        "data",
        help="get real sample scans, index and check your own scans",
        description="Data commands: fetch the real sample scans, or index a folder of your own scans "
        "into a checked, subject-split datalist.json.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="{samples,index}")
    sub.required = True

    p = sub.add_parser(
        "samples",
        help="download, verify and convert the real sample scans (brain MR, chest CT, MNI152, mean head)",
        description="Download the packages that carry the real sample scans (pyradiomics sdist, nilearn, "
        "pydeface) with pip into a cache, verify each scan's sha256, convert to NIfTI (RAS affines) and "
        "write manifest.json, datalist.json (split by subject) and data_license.txt. Reuses what is cached.",
    )
    p.add_argument("--out", default="data/samples", help="output folder (default: %(default)s)")
    p.add_argument("--cache", default=None, help="archive cache folder (default: <out>/../cache)")
    p.add_argument("--force", action="store_true", help="download, extract and convert again even if cached")
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser(
        "index",
        help="check and index a folder of NIfTI / NRRD / DICOM scans into datalist.json",
        description="Find NIfTI (.nii, .nii.gz), NRRD and DICOM series below DIR, check every volume "
        "(readable, 3D, finite, not constant), convert DICOM/NRRD to NIfTI under <out>/nifti, split by "
        "subject (DICOM PatientID or file name) with a fixed seed and write datalist.json + manifest.json. "
        "Rejected files are listed with the reason.",
    )
    p.add_argument("folder", metavar="DIR", help="folder with the scans (searched recursively)")
    p.add_argument("--out", default=None, help="where datalist.json, manifest.json, nifti/ go (default: DIR)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject split (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of subjects for validation (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of subjects for test (default: %(default)s)")
    p.add_argument("--modality", choices=["MR", "CT"], default=None,
                   help="modality of non-DICOM files (default: guessed from intensities: CT if min < -500)")
    p.set_defaults(func=cmd_index)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medsr-data")
    subparsers = parser.add_subparsers(dest="command", metavar="{data}")
    subparsers.required = True
    register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Bundle configs written as short overlays over shared bases, rendered to flat self-contained files.

The six bundles share most of their pipeline (data, physics degradation, trainer, evaluator, handlers,
tracking). That shared part lives once in ``bundles/_base/``; each bundle states only what its method
is in ``bundles/<name>/overlays/<config>.json``, which names its base with a ``"_base_"`` key (a path,
or a list of paths, relative to the overlay; bases may have bases). Files whose names start with ``_``
(e.g. ``_network.json``, the network that train.json and inference.json share) are fragments that
overlays list as bases; they are not rendered themselves. Merging uses MONAI's own rule for
a list of config files (:meth:`monai.bundle.ConfigParser.load_config_files`): later files override
earlier ones, ``"a#b#c"`` keys reach into nested entries and ``"+key"`` appends to a list / dict.

MONAI bundles (and the model zoo) must be self-contained, so the merged result is written, flat, to
``bundles/<name>/configs/<config>.json``: that is what ``python -m monai.bundle run`` and
``medsr publish`` read. Edit the overlay or the base, then render::

    python -m medsr_monai.overlays bundles           # re-render every bundle
    python -m medsr_monai.overlays --check bundles   # exit 1 if a rendered file is stale

A bundle without an ``overlays/`` folder (e.g. one made by a user) is left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from monai.bundle import ConfigParser
from monai.bundle.utils import merge_kv

__all__ = ["BASE_KEY", "GENERATED_KEY", "OVERLAY_DIR", "overlay_chain", "render_overlay", "render_bundle", "main"]

BASE_KEY = "_base_"
GENERATED_KEY = "_generated_"
OVERLAY_DIR = "overlays"


def _read(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: a config file must hold a JSON object")
    return content


def overlay_chain(path: str | Path, _seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """``[(file, content), ...]`` from the deepest base to ``path`` itself, ``_base_`` keys removed.

    Raises:
        ValueError: for a cycle of bases or a file that is not a JSON object (naming the file).
    """
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"{path}: bases form a cycle ({' -> '.join(p.name for p in _seen + (path,))})")
    content = _read(path)
    bases = content.pop(BASE_KEY, [])
    chain: list[tuple[Path, dict]] = []
    for base in [bases] if isinstance(bases, str) else bases:
        chain += overlay_chain(path.parent / base, _seen + (path,))
    return chain + [(path, content)]


def render_overlay(path: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """The flat config an overlay stands for: its bases and itself merged by MONAI's list-of-files rule.

    Args:
        path: the overlay JSON file.
        root: folder the ``_generated_`` note names files relative to (default: the overlay's bundle's parent).

    Example::

        cfg = render_overlay("bundles/srcnn/overlays/train.json")
        cfg["network_def"]["net"]["_target_"]  # 'medsr_monai.networks.SRCNN'
    """
    chain = overlay_chain(path)
    root = Path(root).resolve() if root else Path(path).resolve().parent.parent.parent
    # A config that stands alone (it has ``imports``: train, inference) is merged by MONAI's parser, which
    # resolves ``a#b`` keys. One applied on top of train.json at run time (evaluate, multi_gpu_train) keeps
    # its ``a#b`` keys as written, in order: they only resolve against train.json.
    standalone = any("imports" in content for _, content in chain)
    target: Any = ConfigParser(config={}) if standalone else {}
    for _, content in chain:
        for k, v in content.items():
            if standalone:
                merge_kv(target, k, v)
            elif k.startswith("+") and isinstance(target.get(k), list) and isinstance(v, list):
                target[k] = target[k] + v  # "+key" stays a "+key": it appends to train.json's list at run time
            else:
                _set_additive(target, k, v)
    flat = target.get() if standalone else target
    flat.pop(GENERATED_KEY, None)
    files = " + ".join(_relative(p, root) for p, _ in chain)
    note = f"rendered by `python -m medsr_monai.overlays` from {files}; edit those, not this file"
    return {GENERATED_KEY: note, **flat}


def _set_additive(target: dict, key: str, value: Any) -> None:
    """Set ``key`` in an additive config: into an entry of the same file when ``key`` reaches inside one
    (``validate#handlers#metrics#sharpness`` into ``validate#handlers``), else as written."""
    parts = key.replace("::", "#").split("#")
    for i in range(len(parts) - 1, 0, -1):
        head = "#".join(parts[:i])
        if head not in target:
            continue
        node = target[head]
        for part in parts[i:-1]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                node = None
                break
        if isinstance(node, dict):
            node[parts[-1]] = value
            return
        if isinstance(node, list) and parts[-1].isdigit() and int(parts[-1]) < len(node):
            node[int(parts[-1])] = value
            return
    target[key] = value


def _relative(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return p.as_posix()


def _dump(cfg: dict) -> str:
    return json.dumps(cfg, indent=4) + "\n"


def render_bundle(bundle: str | Path, check: bool = False) -> list[Path]:
    """Render every ``overlays/*.json`` of a bundle into ``configs/``.

    Args:
        bundle: the bundle folder.
        check: only compare; nothing is written.

    Returns:
        The rendered files that were (``check=False``) or would be (``check=True``) changed.
    """
    bundle = Path(bundle)
    changed = []
    for overlay in sorted((bundle / OVERLAY_DIR).glob("*.json")):
        if overlay.name.startswith("_"):  # a fragment other overlays include (e.g. _network.json), not a config
            continue
        target = bundle / "configs" / overlay.name
        text = _dump(render_overlay(overlay))
        if not target.is_file() or target.read_text() != text:
            changed.append(target)
            if not check:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
    return changed


def _bundles(paths: Sequence[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if (p / OVERLAY_DIR).is_dir():
            out.append(p)
        elif p.is_dir():
            out += sorted(b for b in p.iterdir() if (b / OVERLAY_DIR).is_dir())
        else:
            raise FileNotFoundError(f"{p}: not a bundle folder or a folder of bundles")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medsr_monai.overlays", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", default=["bundles"], help="bundle folders or a folder of bundles (default: bundles)")
    ap.add_argument("--check", action="store_true", help="only report stale rendered configs; exit 1 if any")
    args = ap.parse_args(argv)
    try:
        bundles = _bundles(args.paths)
        stale = [f for b in bundles for f in render_bundle(b, check=args.check)]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in stale:
        print(("stale: " if args.check else "rendered: ") + str(f))
    if not bundles:
        print("no bundle with an overlays/ folder found", file=sys.stderr)
        return 2
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())

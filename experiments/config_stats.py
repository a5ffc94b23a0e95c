"""How much a newcomer has to read to understand a bundle: lines, characters and long expressions of the config
files people edit, before (flat configs at a git revision) and now (overlays + shared bases, or flat configs for
bundles without overlays), plus config values repeated across bundles.

    .venv/bin/python experiments/config_stats.py --before 3b564f7

Prints a Markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPR = re.compile(r'"(\$[^"\\]*(?:\\.[^"\\]*)*)"')


def _files_at(rev: str | None) -> dict[str, str]:
    """{path: text} of the config sources: all bundle JSON at ``rev``, or what people edit now."""
    if rev:
        names = subprocess.check_output(["git", "ls-tree", "-r", "--name-only", rev, "bundles"], cwd=REPO, text=True)
        paths = [n for n in names.split() if n.endswith(".json") and "/configs/" in n and not n.endswith("metadata.json")]
        return {p: subprocess.check_output(["git", "show", f"{rev}:{p}"], cwd=REPO, text=True) for p in paths}
    out = {}
    for p in sorted((REPO / "bundles").rglob("*.json")):
        rel = p.relative_to(REPO).as_posix()
        if rel.endswith("metadata.json") or "/eval/" in rel or "/models/" in rel:
            continue
        bundle = p.relative_to(REPO / "bundles").parts[0]
        has_overlay = (REPO / "bundles" / bundle / "overlays" / p.name).is_file()
        if "/configs/" in rel and has_overlay:
            continue  # rendered: nobody edits it
        out[rel] = p.read_text()
    return out


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}#{k}" if prefix else k)
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}#{i}")
    else:
        yield prefix, json.dumps(obj, sort_keys=True)


def stats(files: dict[str, str]) -> dict:
    lines = sum(t.count("\n") + 1 for t in files.values())
    chars = sum(len(t) for t in files.values())
    exprs = [e for t in files.values() for e in EXPR.findall(t)]
    long_exprs = sum(len(e) > 100 for e in exprs)
    scale = sum(len(re.findall(r'"(?:scale|factor)"\s*:\s*\d', t)) for t in files.values())
    grid = sum(len(re.findall(r'"grid"\s*:', t)) for t in files.values())
    per_file = {p: t.count("\n") + 1 for p, t in files.items()}
    # config values (leaf id = value) found in more than one file: what is stated more than once
    leaf_counts = Counter()
    for p, t in files.items():
        try:
            leaf_counts.update(set(_leaves(json.loads(t))))
        except json.JSONDecodeError:
            continue
    repeated = sum(1 for c in leaf_counts.values() if c > 1)
    return {"files": len(files), "lines": lines, "chars": chars, "expressions": len(exprs),
            "expressions_over_100": long_exprs, "literal_scale_statements": scale, "grid_statements": grid,
            "values_repeated_across_files": repeated, "per_file": per_file}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="3b564f7", help="git revision with the flat configs (default: %(default)s)")
    args = ap.parse_args()
    before, now = stats(_files_at(args.before)), stats(_files_at(None))
    print(f"| measure | before ({args.before}) | now |\n|---|---:|---:|")
    for k in ("files", "lines", "chars", "expressions", "expressions_over_100", "literal_scale_statements",
              "grid_statements", "values_repeated_across_files"):
        print(f"| {k} | {before[k]} | {now[k]} |")
    print("\nlines per file now:")
    for p, n in now["per_file"].items():
        print(f"  {n:5d}  {p}")


if __name__ == "__main__":
    main()

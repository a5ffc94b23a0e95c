"""``medsr compare``: a table (and two pictures) of the best or latest run of each method and task in an MLflow store.

What the runs record (inspected on real tiny runs of srcnn/edsr, training + ``evaluate.json``; the other bundles'
configs use the same metric handlers):

* one MLflow experiment per bundle (``srcnn``, ``edsr``, ...), run names ``<method>-<time>-<pid>`` (training) and
  ``<method>-eval-<time>-<pid>`` (evaluation, also tagged ``medsr.stage=evaluate``);
* training runs: params ``method, num_params, scale|task, acceleration, dose_fraction, batch_size, epoch_length,
  max_epochs, ...``; validation metrics ``val_*``; artifacts ``grid_latest.png`` (LR | baseline | SR | HR of a few
  validation slices), ``val_metrics.json``, ``model.pt``, ``executed_config.json``;
* evaluation runs: params ``method, scale|task, eval_split, checkpoint`` (no ``num_params``); test metrics ``test_*``;
  artifacts ``grid_latest.png`` (held-out slices), ``metrics.json``, ``slices.csv``.

Metric names follow ``{prefix}{method}_{psnr|ssim}`` and ``{prefix}{baseline}_gain_db`` with ``prefix`` ``test_``
(evaluation) or ``val_`` (validation during training) and ``method`` ``sr`` for the model (SRMetricsHandler, and the
through-plane handler of seqsr_lstm, whose ``{prefix}sr_psnr`` is the mean over its three views). Every run logs
several baselines (the physics' matched ``baseline`` and ``bicubic`` for in-plane SR, ``linear``/``cubic``/``cubic_dc`` through-plane,
``lowdose``/``gaussian``/``nlm`` for denoising), so which one is "the" baseline of a row is a choice:
:data:`BASELINES` fixes it per bundle and task (the baseline each bundle's README/demo table quotes, and which exists
on all slices, not only MR ones), and :data:`BASELINE_FALLBACK` plus a last pattern rule (any other
``{prefix}<key>_psnr``) cover bundles added later without a change here. The gain is the logged, per-slice paired
``{prefix}<baseline>_gain_db`` when present, else the difference of the two mean PSNRs.

Test metrics of an evaluation run are preferred: they are the held-out patients. A method/task without an
evaluation run falls back to its training run's last validation metrics, and the ``source`` column says ``test`` or
``val``. "Task" (what is solved: ``x2``, ``mri_recon R=4``, ``ct_denoise dose=0.25``, ``x2 through-plane``) is what
rows are grouped by; everything else is a param and does not split rows. Train time is the training run's
MLflow run duration (end - start: the trainer's run with its validations; process start-up is outside it);
images/s is a logged ``*images_per_s*``/``*throughput*`` metric when there is one, else an estimate
``max_epochs * epoch_length * batch_size / train time`` (marked ``~``). Params come from the
training run (``num_params``); an evaluation run is matched to the latest finished training run of the same
experiment and task that started before it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CompareError", "EmptyStoreError", "Row", "BASELINES", "BASELINE_FALLBACK", "collect_rows", "format_rows",
           "plot_quality_speed", "plot_side_by_side", "compare", "check_store"]

#: baseline of each bundle (and task): the matched classical inverse of its physics, which its own results table
#: quotes and which covers every test slice (``baseline``: k-space zero-fill on MR, cubic on CT; ``cubic_dc``: cubic +
#: slice-thickness consistency); runs recorded before the physics models fall back to the next keys
BASELINES: dict[tuple[str, str | None], str] = {
    ("srcnn", None): "baseline",
    ("edsr", None): "baseline",
    ("srgan", None): "baseline",
    ("seqsr_lstm", None): "cubic_dc",
    ("unet", "mri_recon"): "zerofill",
    ("unet", "ct_denoise"): "lowdose",
    ("cyclegan", None): "lowdose",
}
#: tried in this order for bundles/tasks not in :data:`BASELINES`; then any other ``{prefix}<key>_psnr``
BASELINE_FALLBACK = ("baseline", "cubic_dc", "bicubic", "cubic", "zerofill", "lowdose", "linear", "gaussian", "nlm")
#: ``{prefix}<key>_psnr`` keys that are not baselines (the model itself, the modality-balanced mean)
_NOT_BASELINE = {"sr", "balanced"}
_GROUP_PREFIX = re.compile(r"^(MR|CT|native|reformat_a|reformat_b)_")
_TASK_PARAMS = ("task", "scale", "acceleration", "dose_fraction")
GRID_ARTIFACTS = ("grid_latest.png",)


class CompareError(RuntimeError):
    """The store cannot be read (the message names it)."""


class EmptyStoreError(CompareError):
    """The store holds no finished runs with PSNR metrics."""


@dataclass
class Row:
    method: str
    task: str
    source: str  # "test" (evaluation run) or "val" (training run's validation)
    psnr: float | None
    ssim: float | None
    baseline: str | None
    baseline_psnr: float | None
    baseline_ssim: float | None
    gain_db: float | None
    train_time_s: float | None
    images_per_s: float | None
    images_per_s_estimated: bool
    params: int | None
    run_id: str
    run_name: str
    train_run_id: str | None
    start_time: int
    image: str | None = field(default=None, repr=False)  # local path of the grid PNG, once fetched


# --------------------------------------------------------------------------------------------------- store
def check_store(uri: str) -> None:
    """Fail with a message naming ``uri`` if it is not a readable store (a sqlite file must already exist:
    MLflow would silently create an empty one)."""
    from medsr_monai.tracking.store import TrackingError, check_tracking_uri

    if uri.startswith("sqlite:"):
        path = Path(uri.split(":///", 1)[-1])
        if not path.is_file():
            raise CompareError(f"MLflow store {uri!r} does not exist ({path} is not a file); "
                               "pass --tracking-uri sqlite:///<abs>/mlflow.db or http://host:port")
        return
    try:
        check_tracking_uri(uri)
    except TrackingError as e:
        raise CompareError(str(e)) from e


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _fmt_num(v: str) -> str:
    try:
        f = float(v)
        return str(int(f)) if f.is_integer() else f"{f:g}"
    except (TypeError, ValueError):
        return str(v)


def task_of(params: dict[str, str]) -> str:
    """A short label of what a run solves, from its params (``x2``, ``mri_recon R=4``, ``ct_denoise dose=0.25``).

    Only identifier-like ``task`` values are kept (unet's ``mri_recon``/``ct_denoise``); a free-text ``task``
    (cyclegan's description) is dropped because the evaluation run does not log it, and training and evaluation
    runs of one task must get the same label. ``acceleration`` counts for reconstruction tasks only and
    ``dose_fraction`` for denoising ones (unet logs both for either task).
    """
    parts = []
    task = params.get("task")
    if not task or task == "-" or not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", task):
        task = None
    if task:
        parts.append(task)
    if params.get("scale") not in (None, "", "-"):
        parts.append(f"x{_fmt_num(params['scale'])}")
    if params.get("acceleration") not in (None, "", "-") and (task is None or "recon" in task):
        parts.append(f"R={_fmt_num(params['acceleration'])}")
    if params.get("dose_fraction") not in (None, "", "-") and (task is None or "denois" in task):
        parts.append(f"dose={_fmt_num(params['dose_fraction'])}")
    if "slice_axis" in params or params.get("method", "").startswith("seqsr"):
        parts.append("through-plane")
    return " ".join(parts) or "-"


def pick_baseline(method: str, task_param: str | None, metrics: dict[str, float], prefix: str) -> str | None:
    """The baseline key of a run: :data:`BASELINES`, then :data:`BASELINE_FALLBACK`, then any other key."""
    have = {k[len(prefix):-len("_psnr")] for k in metrics if k.startswith(prefix) and k.endswith("_psnr")}
    have = {k for k in have if k not in _NOT_BASELINE and not _GROUP_PREFIX.match(k)}
    for key in ((method, task_param), (method, None)):
        if key in BASELINES and BASELINES[key] in have:
            return BASELINES[key]
    for b in BASELINE_FALLBACK:
        if b in have:
            return b
    return sorted(have)[0] if have else None


def _quality(method: str, params: dict[str, str], metrics: dict[str, float], prefix: str) -> dict[str, Any] | None:
    psnr = metrics.get(f"{prefix}sr_psnr", metrics.get(f"{prefix}psnr"))
    if psnr is None or not math.isfinite(psnr):
        return None
    ssim = metrics.get(f"{prefix}sr_ssim", metrics.get(f"{prefix}ssim"))
    b = pick_baseline(method, params.get("task"), metrics, prefix)
    bp = metrics.get(f"{prefix}{b}_psnr") if b else None
    bs = metrics.get(f"{prefix}{b}_ssim") if b else None
    gain = metrics.get(f"{prefix}{b}_gain_db") if b else None
    if gain is None and bp is not None:
        gain = psnr - bp
    return {"psnr": psnr, "ssim": ssim, "baseline": b, "baseline_psnr": bp, "baseline_ssim": bs, "gain_db": gain}


def _is_eval(run) -> bool:
    return run.data.tags.get("medsr.stage") == "evaluate" or "-eval-" in (run.info.run_name or "") \
        or "eval_split" in run.data.params


def _speed(train) -> tuple[float | None, float | None, bool]:
    if train is None:
        return None, None, False
    t = None
    if train.info.end_time and train.info.start_time:
        t = (train.info.end_time - train.info.start_time) / 1000.0
    for k, v in train.data.metrics.items():
        if "images_per_s" in k or "throughput" in k or k.endswith("img_per_s"):
            return t, float(v), False
    p = train.data.params
    try:
        n = float(p["max_epochs"]) * float(p["epoch_length"]) * float(p["batch_size"])
        return t, (n / t if t else None), True
    except (KeyError, ValueError):
        return t, None, False


def collect_rows(uri: str, select: str = "best", experiments: list[str] | None = None) -> list[Row]:
    """One :class:`Row` per (method, task): the best (highest method PSNR) or latest finished run, test metrics of
    evaluation runs preferred over training runs' validation metrics.

    Raises:
        CompareError: the store cannot be read; EmptyStoreError: it holds no usable runs.
    """
    if select not in ("best", "latest"):
        raise ValueError(f"select must be 'best' or 'latest', not {select!r}")
    check_store(uri)
    client = _client(uri)
    try:
        exps = [e for e in client.search_experiments() if experiments is None or e.name in experiments]
    except Exception as e:  # noqa: BLE001 - any backend failure: name the store
        raise CompareError(f"cannot read MLflow store {uri!r}: {type(e).__name__}: {e}") from e
    rows: list[Row] = []
    for exp in exps:
        runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=5000)
        # `medsr tune` studies and trials: short-budget runs selected on validation, not results to compare
        runs = [r for r in runs if not r.data.tags.get("medsr.tune_role")]
        trains = sorted((r for r in runs if not _is_eval(r)), key=lambda r: r.info.start_time)
        groups: dict[tuple[str, str], dict[str, list]] = {}
        for r in runs:
            method = r.data.params.get("method") or r.data.tags.get("medsr.method") or exp.name
            key = (method, task_of(r.data.params))
            groups.setdefault(key, {"test": [], "val": []})["test" if _is_eval(r) else "val"].append(r)
        for (method, task), by_src in groups.items():
            source = "test" if any(_quality(method, r.data.params, r.data.metrics, "test_") for r in by_src["test"]) \
                else "val"
            cands = []
            for r in by_src[source]:
                q = _quality(method, r.data.params, r.data.metrics, f"{source}_")
                if q:
                    cands.append((r, q))
            if not cands:
                continue
            pick = (max(cands, key=lambda c: c[1]["psnr"]) if select == "best"
                    else max(cands, key=lambda c: c[0].info.start_time))
            run, q = pick
            if source == "val":
                train = run
            else:  # the training run this evaluation most likely evaluated
                before = [t for t in trains if t.info.start_time <= run.info.start_time
                          and task_of(t.data.params) == task]
                train = before[-1] if before else None
            t, ips, est = _speed(train)
            nparams = (train or run).data.params.get("num_params")
            rows.append(Row(method=method, task=task, source=source, train_time_s=t, images_per_s=ips,
                            images_per_s_estimated=est, params=int(float(nparams)) if nparams else None,
                            run_id=run.info.run_id, run_name=run.info.run_name or "", start_time=run.info.start_time,
                            train_run_id=train.info.run_id if train else None, **q))
    if not rows:
        raise EmptyStoreError(f"MLflow store {uri!r} has no finished runs with PSNR metrics"
                              + (f" in experiments {experiments}" if experiments else "")
                              + " (train a bundle first, e.g. `medsr demo`)")
    return sorted(rows, key=lambda r: (r.task, -(r.psnr or 0.0)))


# --------------------------------------------------------------------------------------------------- output
COLUMNS = ("method", "task", "source", "psnr", "ssim", "baseline", "baseline_psnr", "baseline_ssim", "gain_db",
           "train_time_s", "images_per_s", "params", "run_name", "run_id")


def _cell(row: Row, col: str) -> str:
    v = getattr(row, col)
    if v is None:
        return "-"
    if col in ("psnr", "baseline_psnr"):
        return f"{v:.2f}"
    if col in ("ssim", "baseline_ssim"):
        return f"{v:.4f}"
    if col == "gain_db":
        return f"{v:+.2f}"
    if col == "train_time_s":
        return f"{v:.1f}"
    if col == "images_per_s":
        return ("~" if row.images_per_s_estimated else "") + f"{v:.1f}"
    return str(v)


def format_rows(rows: list[Row], fmt: str = "markdown") -> str:
    """``markdown`` (rounded, for reading), ``csv`` or ``json`` (full precision, for scripts)."""
    if fmt == "json":
        return json.dumps([{k: v for k, v in asdict(r).items() if k != "image"} for r in rows], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS + ("images_per_s_estimated",))
        for r in rows:
            w.writerow(["" if getattr(r, c) is None else getattr(r, c) for c in COLUMNS] + [r.images_per_s_estimated])
        return buf.getvalue()
    if fmt != "markdown":
        raise ValueError(f"format must be markdown, csv or json, not {fmt!r}")
    head = ["method", "task", "source", "PSNR dB", "SSIM", "baseline", "base PSNR", "base SSIM", "gain dB",
            "train s", "img/s", "params", "run"]
    cols = ["method", "task", "source", "psnr", "ssim", "baseline", "baseline_psnr", "baseline_ssim", "gain_db",
            "train_time_s", "images_per_s", "params", "run_name"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(r, c) for c in cols) + " |" for r in rows]
    notes = ["source: test = held-out split of an evaluation run, val = validation metrics of the training run "
             "(no evaluation run); gain = method - baseline PSNR (paired per slice where logged)."]
    if any(r.images_per_s_estimated for r in rows):
        notes.append("img/s with ~: estimated as max_epochs*epoch_length*batch_size / train wall time.")
    return "\n".join(lines + [""] + notes)


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality_speed(rows: list[Row], path: str | os.PathLike) -> Path:
    """Bar chart of the PSNR gain over each row's baseline, and a scatter of that gain against training images/s."""
    plt = _mpl()
    labels = [f"{r.method}\n{r.task} ({r.source})" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 5), 4.5))
    gains = [r.gain_db if r.gain_db is not None else 0.0 for r in rows]
    ax1.bar(range(len(rows)), gains, color=["tab:green" if g >= 0 else "tab:red" for g in gains])
    ax1.axhline(0, color="k", lw=0.8)
    ax1.set_xticks(range(len(rows)), labels, fontsize=7)
    ax1.set_ylabel("PSNR gain over baseline (dB)")
    ax1.set_title("quality: gain over baseline")
    for r in rows:  # gain, not raw PSNR: PSNRs of different tasks/splits are not comparable, gains roughly are
        x = r.images_per_s if r.images_per_s is not None else float("nan")
        y = r.gain_db if r.gain_db is not None else float("nan")
        ax2.scatter([x], [y], s=40)
        ax2.annotate(f"{r.method} {r.task} ({r.psnr:.2f} dB)", (x, y), fontsize=7, xytext=(3, 3),
                     textcoords="offset points")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xlabel("training images/s (~ = estimated, see table)")
    ax2.set_ylabel("PSNR gain over baseline (dB)")
    ax2.set_title("quality vs speed")
    speeds = [r.images_per_s for r in rows if r.images_per_s]
    if speeds and min(speeds) > 0 and max(speeds) / min(speeds) > 20:
        ax2.set_xscale("log")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def fetch_images(uri: str, rows: list[Row], dst: str | os.PathLike) -> list[str]:
    """Download each row's grid PNG (evaluation run first, then its training run) into ``dst``; sets ``row.image``.
    Returns notes about rows without a usable image."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in the table output
    client, notes = _client(uri), []
    for r in rows:
        r.image = None
        for rid in [r.run_id] + ([r.train_run_id] if r.train_run_id and r.train_run_id != r.run_id else []):
            try:
                names = {a.path for a in client.list_artifacts(rid)}
                art = next((a for a in GRID_ARTIFACTS if a in names), None)
                if art is None:
                    pngs = sorted(n for n in names if n.endswith(".png"))
                    art = pngs[-1] if pngs else None
                if art:
                    out = Path(dst) / rid
                    out.mkdir(parents=True, exist_ok=True)
                    r.image = client.download_artifacts(rid, art, str(out))
                    break
            except Exception as e:  # noqa: BLE001 - an unreadable artifact only drops the picture
                notes.append(f"{r.method} {r.task}: cannot fetch image of run {rid}: {type(e).__name__}: {e}")
        if r.image is None:
            notes.append(f"{r.method} {r.task}: run {r.run_name} has no PNG artifact; skipped in the side-by-side")
    return notes


def plot_side_by_side(rows: list[Row], path: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """One panel per row with an image (the runs' grid PNG: LR | baseline | SR | HR of the same first held-out
    slices, since every evaluation iterates the test split in the same order). Unreadable images are skipped with a
    note; returns ``(path or None when no image at all, notes)``."""
    plt = _mpl()
    notes, imgs = [], []
    for r in rows:
        if not r.image:
            continue
        try:
            imgs.append((r, plt.imread(r.image)))
        except Exception as e:  # noqa: BLE001
            notes.append(f"{r.method} {r.task}: unreadable image {r.image}: {e}; skipped")
    if not imgs:
        return None, notes + ["no run has a usable image: side-by-side PNG not written"]
    fig, axes = plt.subplots(1, len(imgs), figsize=(5 * len(imgs), 5.5), squeeze=False)
    for ax, (r, im) in zip(axes[0], imgs):
        ax.imshow(im)
        ax.set_title(f"{r.method} {r.task} ({r.source}: {r.psnr:.2f} dB)", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, notes


def compare(uri: str, select: str = "best", fmt: str = "markdown", out: str | os.PathLike | None = None,
            plot: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
            experiments: list[str] | None = None) -> tuple[str, list[str]]:
    """All of ``medsr compare``: returns ``(table text, notes)``; writes ``out``/``plot``/``images`` if given."""
    rows = collect_rows(uri, select, experiments)
    text = format_rows(rows, fmt)
    notes: list[str] = []
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text if text.endswith("\n") else text + "\n")
    if plot:
        plot_quality_speed(rows, plot)
    if images:
        with tempfile.TemporaryDirectory() as tmp:
            notes += fetch_images(uri, rows, tmp)
            _, n2 = plot_side_by_side(rows, images)
            notes += n2
    return text, notes

"""``medsr compare`` against a real store: the shared trained srcnn's runs (its training, and its evaluation on the
test split) copied into a private sqlite store, plus edsr trained 1 tiny epoch twice (seeds 0 and 1) into it; then the
table/plots read back from it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from helpers import (bundle_cmd, bundle_env, copy_store, expr, load_state, mlflow_client, run, runs_of, tail,
                     tracking_uri, train_tiny)

from medsr_monai.cli import main
from medsr_monai.compare import collect_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(trained_bundle, tiny_datalist, tmp_path_factory):
    """``(uri, root)``: srcnn (the session's trained fixture, and its evaluation) and edsr (trained twice here, seeds 0
    and 1) in one store."""
    srcnn = trained_bundle("srcnn")
    srcnn.check()
    root = tmp_path_factory.mktemp("compare_store")
    copy_store(srcnn.root, root)
    uri = tracking_uri(root)
    env = bundle_env(root)
    # evaluate.json's run is the evaluator alone, on srcnn's checkpoint; a test before this one may have run it
    # already (tests/test_bundles.py): then its run is in the copy, and a second identical one would tie
    if not [r for r in runs_of(uri, "srcnn") if r.data.tags.get("medsr.stage") == "evaluate"]:
        ov = {"dataset_dir": expr(tiny_datalist.parent), "output_dir": expr(root / "srcnn_eval"),
              "ckpt_dir": expr(srcnn.ckpt_dir)}
        proc = run(bundle_cmd("run", "srcnn", ["train", "evaluate"], **ov), env)
        assert proc.returncode == 0, tail(proc.stdout)
    for seed in (0, 1):
        tb = train_tiny("edsr", tiny_datalist, root, output_dir=expr(root / f"edsr{seed}" / "out"),
                        ckpt_dir=expr(root / f"edsr{seed}" / "models"), seed=seed)
        tb.check()
    return uri, root


def test_another_seed_gives_other_weights_on_the_same_physics(store):
    """The two edsr runs differ only in their seed: their weights must differ, their physics record must not, and
    each run records its own seed (same seed -> identical weights is ``test_reproduce``'s check)."""
    uri, root = store
    w0, w1 = (load_state(root / f"edsr{seed}" / "models" / "model.pt") for seed in (0, 1))
    assert w0.keys() == w1.keys()
    assert torch.equal(w0["physics_record"], w1["physics_record"])
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if k != "physics_record")
    seeds = {json.loads((root / f"edsr{s}" / "out" / "executed_config.json").read_text())["seed"] for s in (0, 1)}
    assert seeds == {0, 1}
    assert sorted(r.data.params["seed"] for r in runs_of(uri, "edsr")) == ["0", "1"]


def _expected(uri: str, bundle: str, stage: str, select: str = "best"):
    """The run compare must pick, straight from MLflow: srcnn -> its eval run (test_*), edsr -> a training run
    (val_*, no evaluation run): the one with the highest val_sr_psnr, or the latest."""
    runs = [r for r in runs_of(uri, bundle) if (r.data.tags.get("medsr.stage") == "evaluate") == (stage == "test")]
    assert runs, [r.info.run_name for r in runs_of(uri, bundle)]
    if select == "latest":
        return max(runs, key=lambda r: r.info.start_time)
    return max(runs, key=lambda r: r.data.metrics[f"{stage}_sr_psnr"])


def test_compare_tables_and_pngs(store, tmp_path, capsys):
    uri, _ = store
    sr_eval, edsr_train = _expected(uri, "srcnn", "test"), _expected(uri, "edsr", "val")
    sr_train = _expected(uri, "srcnn", "val")
    m = sr_eval.data.metrics

    # json: every number as logged
    out_json = tmp_path / "t.json"
    plot, images = tmp_path / "q.png", tmp_path / "img.png"
    assert main(["compare", "--tracking-uri", uri, "--format", "json", "--out", str(out_json),
                 "--plot", str(plot), "--images", str(images)]) == 0
    printed = capsys.readouterr().out
    rows = {r["method"]: r for r in json.loads(out_json.read_text())}
    assert json.loads(printed) == json.loads(out_json.read_text())  # stdout = --out (notes go to stderr)
    assert set(rows) == {"srcnn", "edsr"}
    s, e = rows["srcnn"], rows["edsr"]
    # the baseline of an SR row is the matched inverse of the bundle's physics (MR zero-fill, CT cubic)
    assert (s["task"], s["source"], s["baseline"], s["run_id"]) == ("x2", "test", "baseline", sr_eval.info.run_id)
    assert s["psnr"] == pytest.approx(m["test_sr_psnr"]) and s["ssim"] == pytest.approx(m["test_sr_ssim"])
    assert s["baseline_psnr"] == pytest.approx(m["test_baseline_psnr"])
    assert s["baseline_ssim"] == pytest.approx(m["test_baseline_ssim"])
    assert s["gain_db"] == pytest.approx(m["test_baseline_gain_db"])
    assert s["train_run_id"] == sr_train.info.run_id  # speed/params from the training run it evaluated
    assert s["params"] == int(sr_train.data.params["num_params"])
    assert s["train_time_s"] == pytest.approx((sr_train.info.end_time - sr_train.info.start_time) / 1000)
    assert s["images_per_s"] > 0
    em = edsr_train.data.metrics
    assert (e["source"], e["run_id"], e["params"]) == ("val", edsr_train.info.run_id,
                                                       int(edsr_train.data.params["num_params"]))
    assert e["psnr"] == pytest.approx(em["val_sr_psnr"]) and e["gain_db"] == pytest.approx(em["val_baseline_gain_db"])
    assert e["baseline_psnr"] == pytest.approx(em["val_baseline_psnr"])

    # both PNGs written and readable (the side-by-side has a panel per method: wider than tall)
    import matplotlib.pyplot as plt

    for p in (plot, images):
        im = plt.imread(p)
        assert im.ndim == 3 and im.shape[0] > 100 and im.shape[1] > 100
    assert plt.imread(images).shape[1] > plt.imread(images).shape[0]

    # markdown and csv print both methods with the same (rounded / full) numbers
    assert main(["compare", "--tracking-uri", uri, "--plot", "", "--images", ""]) == 0
    md = capsys.readouterr().out
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ") and "method" not in ln}
    assert set(lines) == {"srcnn", "edsr"}
    assert f"{m['test_sr_psnr']:.2f}" in lines["srcnn"] and f"{m['test_baseline_gain_db']:+.2f}" in lines["srcnn"]
    assert f"{em['val_sr_psnr']:.2f}" in lines["edsr"] and "| val |" in lines["edsr"]
    assert main(["compare", "--tracking-uri", uri, "--format", "csv", "--select", "latest",
                 "--plot", "", "--images", ""]) == 0
    rows_csv = {r["method"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert set(rows_csv) == {"srcnn", "edsr"}
    assert float(rows_csv["srcnn"]["psnr"]) == pytest.approx(m["test_sr_psnr"])
    latest = _expected(uri, "edsr", "val", "latest")
    assert rows_csv["edsr"]["run_id"] == latest.info.run_id
    assert float(rows_csv["edsr"]["gain_db"]) == pytest.approx(latest.data.metrics["val_baseline_gain_db"])
    assert rows_csv["edsr"]["images_per_s_estimated"] == "True"  # the bundles log no throughput metric


def test_run_without_image_is_skipped_with_note(store, tmp_path):
    """Only the edsr training run's grids are removed from its artifact folder: the picture still has srcnn."""
    from medsr_monai.compare import fetch_images, plot_side_by_side

    uri, root = store
    rows = collect_rows(uri)
    edsr = next(r for r in rows if r.method == "edsr")
    art = mlflow_client(uri).get_run(edsr.run_id).info.artifact_uri
    assert art.startswith("/") or art.startswith("file:"), art
    folder = art.split("file://", 1)[-1]
    import pathlib
    import shutil

    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)
    try:
        for p in pathlib.Path(folder).glob("*.png"):
            p.unlink()
        notes = fetch_images(uri, rows, tmp_path / "dl")
        path, notes2 = plot_side_by_side(rows, tmp_path / "side.png")
    finally:
        shutil.rmtree(folder)
        shutil.copytree(backup, folder)
    # the note names the run that lost its picture, and only that one
    (note,) = [n for n in notes if "no PNG" in n]
    assert note.startswith("edsr"), notes
    assert not any("srcnn" in n for n in notes), notes
    # the picture is drawn from the other runs' images: srcnn's panel is there, edsr has none, nothing was unreadable
    assert edsr.image is None and any(r.method == "srcnn" and r.image and Path(r.image).is_file() for r in rows)
    assert notes2 == [] and path is not None and path.is_file()


def test_missing_and_unreachable_store(tmp_path, capsys):
    missing = f"sqlite:///{tmp_path}/nowhere/mlflow.db"
    assert main(["compare", "--tracking-uri", missing]) == 2
    err = capsys.readouterr().err
    assert missing in err and "does not exist" in err
    server = "http://127.0.0.1:9"
    assert main(["compare", "--tracking-uri", server]) == 2
    err = capsys.readouterr().err
    assert server in err and "cannot be reached" in err


def test_empty_store(tmp_path, capsys):
    uri = tracking_uri(tmp_path)
    mlflow_client(uri).search_experiments()  # an initialised store without runs
    assert (tmp_path / "mlflow.db").is_file()
    assert main(["compare", "--tracking-uri", uri, "--plot", "", "--images", ""]) == 1
    err = capsys.readouterr().err
    assert "no finished runs" in err and uri in err


def test_baseline_and_task_rules():
    """The documented table first, then the fallback order, then any other logged baseline (later bundles)."""
    from medsr_monai.compare import pick_baseline, task_of

    m = {"test_sr_psnr": 30.0, "test_zerofill_psnr": 29.0, "test_lowdose_psnr": 25.0, "test_MR_zerofill_psnr": 1.0,
         "test_balanced_psnr": 30.0}
    assert pick_baseline("unet", "mri_recon", m, "test_") == "zerofill"
    assert pick_baseline("unet", "ct_denoise", m, "test_") == "lowdose"
    assert pick_baseline("newnet", None, m, "test_") == "zerofill"  # BASELINE_FALLBACK order
    # SR bundles: the physics' matched baseline; runs recorded before it fall back to cubic
    assert pick_baseline("edsr", None, {"test_sr_psnr": 1.0, "test_baseline_psnr": 0.9, "test_bicubic_psnr": 0.8},
                         "test_") == "baseline"
    assert pick_baseline("edsr", None, {"test_sr_psnr": 1.0, "test_bicubic_psnr": 0.8}, "test_") == "bicubic"
    assert pick_baseline("newnet", None, {"val_sr_psnr": 1.0, "val_foo_psnr": 0.5}, "val_") == "foo"
    assert pick_baseline("newnet", None, {"val_sr_psnr": 1.0}, "val_") is None
    assert task_of({"method": "srcnn", "scale": "2"}) == "x2"
    assert task_of({"method": "unet", "task": "mri_recon", "acceleration": "4", "dose_fraction": "0.25"}) == \
        "mri_recon R=4"
    assert task_of({"method": "unet", "task": "ct_denoise", "acceleration": "-", "dose_fraction": "0.25"}) == \
        "ct_denoise dose=0.25"
    assert task_of({"method": "seqsr_lstm", "scale": "3"}) == "x3 through-plane"
    # cyclegan: free-text task on the training run only; training and evaluation runs must share the label
    assert task_of({"method": "cyclegan", "task": "low-dose -> normal-dose CT (simulated, dose fraction 0.25)",
                    "dose_fraction": "0.25"}) == task_of({"method": "cyclegan", "dose_fraction": "0.25"}) == "dose=0.25"

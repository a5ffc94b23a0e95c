"""Bundle configs as overlays over shared bases: the committed flat configs are what the overlays render to,
handlers are named, DDP drops handlers by type, and every top-level setting reaches MLflow by itself."""

from __future__ import annotations

import json

import pytest
from monai.bundle import ConfigParser

from helpers import REPO
from medsr_monai.overlays import GENERATED_KEY, main, overlay_chain, render_bundle, render_overlay
from medsr_monai.workflows import RANK0_ONLY_HANDLERS, handler_list, rank_handlers

BUNDLES = sorted(p.parent.name for p in (REPO / "bundles").glob("*/overlays"))


def test_every_shipped_bundle_is_written_as_overlays():
    assert BUNDLES == ["cyclegan", "edsr", "seqsr_lstm", "srcnn", "srgan", "unet"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_committed_configs_equal_the_rendered_overlays(bundle):
    """Published bundles are self-contained flat configs: they must be exactly what the overlays say."""
    assert render_bundle(REPO / "bundles" / bundle, check=True) == [], \
        "stale rendered config: run `python -m medsr_monai.overlays bundles` and commit configs/"


def test_rendered_config_is_standalone_and_names_its_sources():
    cfg = json.loads((REPO / "bundles" / "edsr" / "configs" / "train.json").read_text())
    assert "_base_" not in cfg and "overlays/train.json" in cfg[GENERATED_KEY]
    assert cfg["network_def"]["net"]["_target_"] == "medsr_monai.networks.EDSR"
    assert cfg["learning_rate"] == 0.0002 and cfg["method"] == "edsr"
    # the parts stated once in the shared base
    srcnn = json.loads((REPO / "bundles" / "srcnn" / "configs" / "train.json").read_text())
    assert srcnn["train"] == cfg["train"] and srcnn["validate"] == cfg["validate"]
    # evaluate.json is applied over train.json at run time: its nested keys stay as written
    ev = json.loads((REPO / "bundles" / "srgan" / "configs" / "evaluate.json").read_text())
    assert list(ev["validate#handlers"]) == ["best_checkpoint", "checkpoint_loader", "auxiliary", "metrics", "grids",
                                            "stats", "mlflow"]
    assert ev["validate#handlers"]["metrics"]["baseline_keys"] == ["baseline", "bicubic", "srresnet"]


def test_overlay_merge_follows_monai_list_of_files(tmp_path):
    """An overlay renders to what MONAI itself gives for the list [base, overlay]."""
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"imports": ["$import os"], "a": 1, "h": {"x": {"k": 1}, "y": {"k": 2}},
                                "lst": [1]}))
    overlay_dir = tmp_path / "b" / "overlays"
    overlay_dir.mkdir(parents=True)
    body = {"a": 2, "h#y#k": 3, "h#z": {"k": 4}, "+lst": [2]}
    (overlay_dir / "train.json").write_text(json.dumps({"_base_": "../../base.json", **body}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(body))
    expected = ConfigParser.load_config_files([base, plain])
    got = render_overlay(overlay_dir / "train.json")
    assert {k: v for k, v in got.items() if k != GENERATED_KEY} == expected
    assert list(got["h"]) == ["x", "y", "z"]


def test_overlay_errors_name_the_file(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"_base_": "b.json"}))
    b.write_text(json.dumps({"_base_": "a.json"}))
    with pytest.raises(ValueError, match="cycle"):
        overlay_chain(a)
    b.write_text("{not json")
    with pytest.raises(ValueError, match="b.json: not valid JSON"):
        overlay_chain(a)


def test_check_mode_reports_a_stale_config(tmp_path, capsys):
    bundle = tmp_path / "mine"
    (bundle / "overlays").mkdir(parents=True)
    (bundle / "overlays" / "train.json").write_text(json.dumps({"imports": [], "x": 1}))
    assert main(["--check", str(bundle)]) == 1 and "stale" in capsys.readouterr().out
    assert main([str(bundle)]) == 0 and (bundle / "configs" / "train.json").is_file()
    assert main(["--check", str(bundle)]) == 0
    (bundle / "overlays" / "train.json").write_text(json.dumps({"imports": [], "x": 2}))
    assert main(["--check", str(bundle)]) == 1


def test_handler_list_keeps_order_and_drops_removed():
    assert handler_list({"a": 1, "b": None, "c": 3}) == [1, 3]
    assert handler_list([1, None, 2]) == [1, 2]


@pytest.mark.parametrize("bundle", ["srcnn", "unet"])
def test_ddp_drops_exactly_the_rank0_only_handlers_after_one_is_added(bundle, tiny_datalist, tmp_path, monkeypatch):
    """A handler added by name (a second StatsHandler and a non-logging one) changes nothing else: rank 1 keeps
    every handler except the logging / tracking ones, chosen by type."""
    from medsr_monai import workflows

    cfg = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([cfg / "train.json", cfg / "multi_gpu_train.json"])
    parser.update({
        "bundle_root": str(REPO / "bundles" / bundle), "dataset_dir": str(tiny_datalist),
        "output_dir": str(tmp_path / "out"), "ckpt_dir": str(tmp_path / "models"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "network": "$@network_def",  # no process group in this test: the DDP wrapper is not the point here
        "train#handlers#nan_guard": {"_target_": "ignite.handlers.TerminateOnNan"},
        "train#handlers#second_stats": {"_target_": "StatsHandler", "iteration_log": False},
    })
    rank = {"now": 0}
    monkeypatch.setattr(workflows, "process_rank", lambda: rank["now"])
    all_handlers = [type(h).__name__ for h in handler_list(parser.get_parsed_content("train#handlers"))]
    assert all_handlers[-2:] == ["TerminateOnNan", "StatsHandler"]
    rank["now"] = 1
    kept = [type(h).__name__ for h in parser.get_parsed_content("train#trainer#train_handlers", instantiate=True,
                                                                 lazy=False)]
    assert kept == [n for n in all_handlers if n not in RANK0_ONLY_HANDLERS]
    assert "TerminateOnNan" in kept and "ValidationHandler" in kept and "StatsHandler" not in kept
    assert rank_handlers(parser.get_parsed_content("train#handlers"), rank=0) == \
        handler_list(parser.get_parsed_content("train#handlers"))


def _config_sets() -> list[tuple[str, ...]]:
    sets = []
    for bundle in BUNDLES:
        cfg = REPO / "bundles" / bundle / "configs"
        for train in sorted(p.stem for p in cfg.glob("train*.json")):
            sets += [(bundle, train), (bundle, train, "evaluate"), (bundle, train, "multi_gpu_train")]
        sets += [(bundle, p.stem) for p in sorted(cfg.glob("inference*.json"))]
    return sets


@pytest.mark.parametrize("combo", _config_sets(), ids=lambda c: "+".join(c))
def test_every_reference_of_a_config_combination_is_defined(combo):
    """A setting moved between overlays (e.g. into one task's overlay) must not leave an ``@id`` behind that the
    other configs still use: MONAI would only say so when the run reaches it."""
    import re

    bundle, *names = combo
    files = [REPO / "bundles" / bundle / "configs" / f"{n}.json" for n in names]
    parser = ConfigParser(ConfigParser.load_config_files(files))
    refs = set(re.findall(r"@([A-Za-z_][\w#]*)", json.dumps(parser.get())))
    assert [r for r in sorted(refs) if r not in parser and not r.startswith("_meta_")] == []

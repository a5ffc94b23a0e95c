#!/usr/bin/env python
"""Precision and layout settings for CPU training, side by side in one run: images/s and held-out PSNR after the
same wall-time budget.

Settings (``--settings``): ``fp32``; ``bf16`` (the network under ``torch.autocast`` in bfloat16, the bundle's
``amp: "bf16"``); ``channels_last``; ``bf16+channels_last``; ``compile`` (``torch.compile`` of the network, fp32);
``bf16+ema`` (bf16 training, evaluated with an exponential moving average of the weights, decay ``--ema-decay``).

Every setting starts from the same initial weights and sees the same patches in the same order (the bundle's own
``train#preprocessing`` and ``train#slices``, one seed), trains for ``--seconds`` of wall time with the bundle's loss,
optimizer and learning rate (constant: a fixed-time budget has no schedule length), and is then evaluated in fp32
on the **test** subjects of the sample split (whole slices, the bundle's validation pipeline: degradation, clip to
[0, 1]), PSNR per subject and the mean over subjects, next to the matched physics baseline. Settings run one after
the other in one process with ``--threads`` threads, so they compete with nothing but the machine's other load.

Usage::

    .venv/bin/python experiments/amp_benchmark.py --bundle srcnn --seconds 150 --out experiments/results/amp_srcnn.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("fp32", "bf16", "channels_last", "bf16+channels_last", "compile", "bf16+ema")


def parser_for(bundle: str, dataset_dir: Path, setting: str):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    p.read_meta(str(REPO / "bundles" / bundle / "configs" / "metadata.json"))
    p["bundle_root"] = str(REPO / "bundles" / bundle)
    p["dataset_dir"] = str(dataset_dir)
    p["amp"] = "bf16" if "bf16" in setting else None
    p["channels_last"] = "channels_last" in setting
    return p


def evaluate(net, parser, test_slices) -> dict:
    from monai.data import DataLoader, Dataset

    pre = parser.get_parsed_content("validate#preprocessing", lazy=False)
    loader = DataLoader(Dataset(test_slices, transform=pre), batch_size=1, shuffle=False, num_workers=0)
    per = {}
    net.eval()
    with torch.no_grad():
        for b in loader:
            pred = net(b["image"], modality=b["modality"]).clamp(0, 1)
            for key, x in (("model", pred), ("baseline", b["baseline"].clamp(0, 1))):
                mse = torch.mean((x - b["label"]) ** 2).item()
                per.setdefault(b["subject"][0], {}).setdefault(key, []).append(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item())
    subjects = {s: {k: statistics.mean(v) for k, v in d.items()} for s, d in per.items()}
    return {"subjects": subjects,
            "mean_model": statistics.mean(d["model"] for d in subjects.values()),
            "mean_baseline": statistics.mean(d["baseline"] for d in subjects.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="srcnn")
    ap.add_argument("--seconds", type=float, default=150.0, help="wall-time training budget per setting")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--test-slices", type=int, default=24, help="evenly spread slices per test volume")
    ap.add_argument("--dataset-dir", type=Path, default=REPO / "data" / "samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from monai.data import DataLoader, Dataset
    from monai.utils import set_determinism

    from medsr_monai.data import load_datalist, volume_slices

    base = parser_for(args.bundle, args.dataset_dir, "fp32")
    train_slices = base.get_parsed_content("train#slices")
    vol_t = base.get_parsed_content("volume_transforms")
    test_slices = volume_slices(load_datalist(args.dataset_dir, "test"), vol_t, crop_multiple=int(base["scale"]),
                                max_slices_per_volume=args.test_slices, progress=False)
    set_determinism(args.seed)
    init_state = copy.deepcopy(base.get_parsed_content("network_def", lazy=False).state_dict())
    results = {"bundle": args.bundle, "seconds": args.seconds, "threads": args.threads, "torch": torch.__version__,
               "train_slices": len(train_slices), "test_slices": len(test_slices), "settings": {}}
    for setting in args.settings:
        p = parser_for(args.bundle, args.dataset_dir, setting)
        net = p.get_parsed_content("network_def", lazy=False)
        net.load_state_dict(init_state)
        if setting == "compile":
            net.net = torch.compile(net.net)
        opt = torch.optim.Adam(net.parameters(), lr=float(p.get_parsed_content("learning_rate")))
        loss_fn = p.get_parsed_content("loss", lazy=False)
        ema = None
        if setting.endswith("+ema"):
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay))
        pre = p.get_parsed_content("train#preprocessing", lazy=False)
        pre.set_random_state(args.seed)
        g = torch.Generator().manual_seed(args.seed)
        bs = max(1, int(p["batch_size"]) // int(p["patches_per_slice"]))
        loader = DataLoader(Dataset(train_slices, transform=pre), batch_size=bs, shuffle=True, num_workers=0,
                            generator=g)
        net.train()
        step_times, n_img, it = [], 0, 0
        t_start = time.perf_counter()
        done = False
        while not done:
            for batch in loader:
                t0 = time.perf_counter()
                pred = net(batch["image"], modality=batch["modality"])
                loss = loss_fn(pred, batch["label"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema is not None:
                    ema.update_parameters(net)
                step_times.append(time.perf_counter() - t0)
                n_img += batch["label"].shape[0]
                it += 1
                if time.perf_counter() - t_start >= args.seconds:
                    done = True
                    break
        wall = time.perf_counter() - t_start
        eval_net = ema.module if ema is not None else net
        eval_net.amp = None  # evaluated in fp32: the comparison is of what training learned
        ev = evaluate(eval_net, p, test_slices)
        warm = step_times[3:] or step_times
        results["settings"][setting] = {
            "iterations": it, "images": n_img, "wall_s": round(wall, 1),
            "images_per_s_median": round(statistics.median(batch_imgs / t for batch_imgs, t in
                                                           zip([bs * int(p["patches_per_slice"])] * len(warm), warm)), 2),
            "images_per_s_mean": round(n_img / wall, 2),
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in ev.items() if k != "subjects"},
            "subjects": {s: {k: round(v, 3) for k, v in d.items()} for s, d in ev["subjects"].items()},
        }
        r = results["settings"][setting]
        print(f"{setting:20s} {it:5d} it  {r['images_per_s_median']:7.2f} img/s  test PSNR {r['mean_model']:.3f} "
              f"(baseline {r['mean_baseline']:.3f}, gain {r['mean_model'] - r['mean_baseline']:+.3f} dB)", flush=True)
    fp = results["settings"].get("fp32")
    if fp:
        for s, r in results["settings"].items():
            r["speedup_vs_fp32"] = round(r["images_per_s_median"] / fp["images_per_s_median"], 2)
            r["psnr_vs_fp32_db"] = round(r["mean_model"] - fp["mean_model"], 3)
    print(json.dumps({s: {k: r[k] for k in ("speedup_vs_fp32", "psnr_vs_fp32_db") if k in r}
                      for s, r in results["settings"].items()}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

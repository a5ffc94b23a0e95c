#!/usr/bin/env python
"""Training throughput of a bundle: MONAI's ``SupervisedTrainer`` against a plain PyTorch loop.

Both sides are built from the bundle's own ``configs/train.json`` with ``monai.bundle.ConfigParser``:
the same ``train#dataloader`` (same transforms, batch size, patches per slice, ``num_workers``),
the same ``network``, ``loss`` and ``optimizer_def``. Three variants are timed:

* ``plain``        ``for batch in loader: opt.zero_grad(); loss(net(x), y).backward(); opt.step()``
* ``trainer``      the bundle's ``train#trainer`` with ``train_handlers=[]`` (MONAI engine, decollation, ...)
* ``trainer_full`` the bundle's ``train#trainer`` with its full handler list (resume checkpoints, LR
                   schedule, NaN check, stats, progress bar, MLflow per-iteration logging); validation is
                   pushed out of reach (``val_interval`` = 10**9) so that only training iterations are timed.

Each variant gets its own copy of network/optimizer/loader (parsed separately), so all do the same
work. Each iteration is timed from the request for the next batch (data loading is included, as in
real training) to the end of the last ``ITERATION_COMPLETED`` handler; epoch-level handlers
(checkpointing, LR step) and engine start/stop are not per-iteration costs and are excluded.
The variants are run in interleaved blocks of a few seconds (``plain, trainer, trainer_full``, then
reversed, ...) after a warm-up, so that the load of other users of a shared machine hits all of them
alike. ``images`` are HR training patches (batch_size slices x patches_per_slice patches per iteration).

Reported per variant: images/s as the median of the per-iteration images/s ("median", robust to load
spikes), as total images / total time ("mean"), and per second of process CPU time ("cpu": less
affected by other processes competing for the cores); the ratios framework/plain of each; and the
headline ratio "paired": the median over rounds of the ratio of the two blocks of the same round,
which ran back to back and so saw nearly the same machine load. ``torch.set_num_threads`` is left at
its default.

Usage::

    .venv/bin/python experiments/throughput.py --bundles srcnn edsr --seconds 45 --out /tmp/tp.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "trainer", "trainer_full")

Record = tuple[float, float, int]  # (wall seconds, process CPU seconds, images) of one iteration


def bundle_parser(bundle: str, overrides: dict[str, Any] | None = None):
    """A ``ConfigParser`` holding ``bundles/<bundle>/configs/train.json`` with ``overrides`` applied."""
    from monai.bundle import ConfigParser

    bdir = REPO / "bundles" / bundle
    parser = ConfigParser()
    parser.read_config(str(bdir / "configs" / "train.json"))
    parser["bundle_root"] = str(bdir)
    for key, value in (overrides or {}).items():
        parser.set(value, key)
    return parser


class PlainLoop:
    """The reference: a bare PyTorch loop over the bundle's own loader, network, loss and optimizer."""

    def __init__(self, parser):
        self.device = parser.get_parsed_content("device")
        self.loader = parser.get_parsed_content("train#dataloader")
        self.net = parser.get_parsed_content("network")
        self.loss = parser.get_parsed_content("loss")
        self.opt = parser.get_parsed_content("optimizer_def")
        self._it = None

    def run(self, n: int) -> list[Record]:
        self.net.train()
        out: list[Record] = []
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = iter(self.loader)
                batch = next(self._it)
            x, y = batch["image"].to(self.device), batch["label"].to(self.device)
            kw = {"modality": batch["modality"]} if hasattr(self.net, "physics") and "modality" in batch else {}
            self.opt.zero_grad()
            self.loss(self.net(x, **kw), y).backward()
            self.opt.step()
            out.append((time.perf_counter() - t0, time.process_time() - c0, int(x.shape[0])))
        return out

    def close(self) -> None:
        pass


class TrainerLoop:
    """The bundle's ``train#trainer`` run for ``n`` iterations at a time (one epoch of length ``n``)."""

    def __init__(self, parser, bundle: str, full: bool, work_dir: Path):
        from ignite.engine import Events

        overrides: dict[str, Any] = {"train#trainer#max_epochs": 1}
        if full:
            out = work_dir / bundle
            overrides.update({
                "output_dir": str(out), "ckpt_dir": str(out / "models"), "resume": False,
                "val_interval": 10**9, "experiment_name": "bench-throughput", "run_name": f"throughput-{bundle}",
            })
        else:
            overrides["train#trainer#train_handlers"] = []
        for key, value in overrides.items():
            parser.set(value, key)
        self.trainer = parser.get_parsed_content("train#trainer")
        self.records: list[Record] = []
        self._t0 = self._c0 = 0.0
        self._n = 0

        def batch_started(engine):
            self._t0, self._c0 = time.perf_counter(), time.process_time()

        def batch_completed(engine):
            self._n = int(len(engine.state.batch["label"]))

        def iteration_completed(engine):  # attached last: runs after every other per-iteration handler
            self.records.append((time.perf_counter() - self._t0, time.process_time() - self._c0, self._n))

        self.trainer.add_event_handler(Events.GET_BATCH_STARTED, batch_started)
        started = self.trainer._event_handlers[Events.GET_BATCH_STARTED]
        started.insert(0, started.pop())  # first, so that nothing before the batch request escapes the clock
        self.trainer.add_event_handler(Events.GET_BATCH_COMPLETED, batch_completed)
        self.trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration_completed)

    def run(self, n: int) -> list[Record]:
        from ignite.engine import Engine

        self.records = []
        # MONAI's Workflow.run() re-reads epoch_length from len(loader) on a second call; Engine.run with a
        # reset state runs exactly n iterations (the loader iterator is continued / restarted as needed).
        self.trainer.state.max_epochs = None
        self.trainer.state.max_iters = None
        Engine.run(self.trainer, data=self.trainer.data_loader, max_epochs=1, epoch_length=n)
        return list(self.records)

    def close(self) -> None:
        pass


def summarise(records: list[Record]) -> dict[str, Any]:
    secs = [s for s, _, _ in records]
    imgs = [n for _, _, n in records]
    per_iter = [n / s for s, _, n in records if s > 0]
    per_iter_cpu = [n / c for _, c, n in records if c > 0]
    return {
        "iterations": len(records),
        "images": int(sum(imgs)),
        "seconds": float(sum(secs)),
        "img_s_mean": float(sum(imgs) / sum(secs)) if secs and sum(secs) > 0 else float("nan"),
        "img_s_median": float(statistics.median(per_iter)) if per_iter else float("nan"),
        "s_per_iter_median": float(statistics.median(secs)) if secs else float("nan"),
        "img_per_cpu_s_median": float(statistics.median(per_iter_cpu)) if per_iter_cpu else float("nan"),
        "per_iteration_wall_cpu_images": [[round(s, 4), round(c, 4), n] for s, c, n in records],
    }


def add_paired_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Per-round ratios framework/plain of the block throughputs, and their median over the rounds.

    Blocks of the same round ran next to each other in time, so each round's ratio sees (nearly) the same
    machine load; the median over rounds is the estimate least disturbed by slow drifts of the load.
    Works on a stored result too (the per-iteration records keep the run order).
    """
    block = int(result.get("iterations_per_block") or 0)
    variants = result.get("variants", {})
    if not block or "plain" not in variants:
        return result

    def per_round(v: str) -> list[float]:
        recs = variants[v]["per_iteration_wall_cpu_images"]
        out = []
        for i in range(0, len(recs), block):
            chunk = recs[i:i + block]
            out.append(sum(r[2] for r in chunk) / sum(r[0] for r in chunk))
        return out

    plain = per_round("plain")
    result["rounds_img_s"] = {v: [round(x, 3) for x in per_round(v)] for v in variants}
    for v in variants:
        if v == "plain":
            continue
        ratios = [a / b for a, b in zip(per_round(v), plain) if b > 0]
        result[f"ratio_{v}_paired_rounds"] = [round(r, 4) for r in ratios]
        result[f"ratio_{v}_paired_median"] = float(statistics.median(ratios)) if ratios else float("nan")
    return result


def measure(bundle: str, seconds: float = 45.0, rounds: int = 0, warmup: int = 0, iters: int = 0,
            block_s: float = 8.0, variants: tuple[str, ...] = VARIANTS, work_dir: Path | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time ``variants`` of one bundle; see the module docstring.

    Args:
        seconds: timed seconds wanted per variant (sets the iteration count when ``iters`` is 0).
        rounds: interleaved rounds (0: enough for blocks of about ``block_s`` seconds); each variant runs
            ``ceil(iters / rounds)`` timed iterations per round, the order reversed every other round.
        warmup: untimed iterations per variant before the rounds (0: about 5 s worth, 1..5).
        iters: timed iterations per variant (0: from ``seconds`` and the warm-up speed, 3..40).
        block_s: wanted length of one block when ``rounds`` is 0 (short blocks: finer interleaving).
    """
    from monai.utils import set_determinism

    work_dir = Path(work_dir or REPO / "experiments" / "runs" / "throughput")
    set_determinism(seed=0)
    t_build = time.perf_counter()
    loops: dict[str, Any] = {}
    for v in variants:
        parser = bundle_parser(bundle)
        loops[v] = PlainLoop(parser) if v == "plain" else TrainerLoop(parser, bundle, v == "trainer_full", work_dir)
    log(f"[throughput {bundle}] built {', '.join(variants)} in {time.perf_counter() - t_build:.1f} s")

    # warm-up (untimed; the first batches of a loader are slow); the first plain iteration sizes the warm-up
    first = loops[variants[0]].run(1)
    n_warm = warmup or max(1, min(5, round(5.0 / max(first[0][0], 1e-3))))
    warm: dict[str, list[Record]] = {variants[0]: first + (loops[variants[0]].run(n_warm - 1) if n_warm > 1 else [])}
    for v in variants[1:]:
        warm[v] = loops[v].run(n_warm)
    t_est = statistics.median([r[0] for recs in warm.values() for r in recs[-max(1, n_warm - 1):]])
    n_total = iters or max(3, min(40, round(seconds / max(t_est, 1e-3))))
    if not rounds:
        rounds = max(1, math.ceil(n_total / max(1, round(block_s / max(t_est, 1e-3)))))
    block = max(1, math.ceil(n_total / rounds))
    log(f"[throughput {bundle}] warm-up {n_warm} it/variant ({t_est:.2f} s/it); timing {rounds} rounds x "
        f"{block} it per variant")

    records: dict[str, list[Record]] = {v: [] for v in variants}
    order = list(variants)
    for r in range(rounds):
        for v in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            recs = loops[v].run(block)
            records[v] += recs
            log(f"[throughput {bundle}] round {r + 1}/{rounds} {v:<12} "
                f"{sum(x[2] for x in recs) / sum(x[0] for x in recs):7.2f} img/s ({len(recs)} it, "
                f"{time.perf_counter() - t:.1f} s)")

    result: dict[str, Any] = {
        "bundle": bundle, "warmup_iterations": n_warm, "rounds": rounds, "iterations_per_block": block,
        "torch_threads": torch.get_num_threads(),
        "batch": {k: config_value(bundle, k) for k in ("batch_size", "patches_per_slice", "patch_size")},
        "s_per_iter_median_all": float(statistics.median([x[0] for recs in records.values() for x in recs])),
        "variants": {v: summarise(records[v]) for v in variants},
        "warmup": {v: [[round(a, 4), round(b, 4), n] for a, b, n in warm[v]] for v in variants},
    }
    if "plain" in variants:
        plain = result["variants"]["plain"]
        for v in variants:
            if v == "plain":
                continue
            s = result["variants"][v]
            result[f"ratio_{v}_median"] = s["img_s_median"] / plain["img_s_median"]
            result[f"ratio_{v}_mean"] = s["img_s_mean"] / plain["img_s_mean"]
            result[f"ratio_{v}_cpu_median"] = s["img_per_cpu_s_median"] / plain["img_per_cpu_s_median"]
    add_paired_ratios(result)
    for loop in loops.values():
        loop.close()
    del loops
    gc.collect()
    return result


def config_value(bundle: str, key: str) -> Any:
    return json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text()).get(key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--bundles", nargs="+", default=["srcnn", "edsr"])
    ap.add_argument("--seconds", type=float, default=45.0, help="timed seconds per variant")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (0: blocks of about --block-s)")
    ap.add_argument("--block-s", type=float, default=8.0, help="seconds per block when --rounds is 0")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up iterations per variant (0: auto)")
    ap.add_argument("--iters", type=int, default=0, help="timed iterations per variant (0: auto)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault(
        "MLFLOW_TRACKING_URI", f"sqlite:///{(REPO / 'experiments' / 'runs' / 'mlruns' / 'mlflow.db').as_posix()}")
    Path(os.environ["MLFLOW_TRACKING_URI"].split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for b in args.bundles:
        r = measure(b, args.seconds, args.rounds, args.warmup, args.iters, args.block_s, tuple(args.variants))
        results[b] = r
        line = ", ".join(f"{v} {r['variants'][v]['img_s_mean']:.2f} img/s" for v in args.variants)
        ratios = ", ".join(f"{k[6:]} {v:.3f}" for k, v in r.items() if k.startswith("ratio_") and isinstance(v, float))
        print(f"{b}: {line}; ratios {ratios}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

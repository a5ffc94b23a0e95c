"""Ignite workflows of the adversarial bundles (SRGAN, CycleGAN).

MONAI's ``GanTrainer`` trains an unconditional generator from a latent code: it feeds the generator
``g_prepare_batch(batch_size, latent_shape)`` and the discriminator real images, so it has no place for
the LR input of a conditional SR generator, for pixel / feature losses against a paired target, for a
pixel-loss pre-training phase, or for two generators and two discriminators with a cycle. These trainers
are MONAI :class:`~monai.engines.Trainer` subclasses instead: every MONAI / Ignite handler (checkpointing,
LR schedules, validation, stats, MLflow) attaches to them as to ``SupervisedTrainer``.

Each iteration's ``engine.state.output`` is a dict with the images (``image``, ``label``, ``pred``, ...),
``loss`` (the generator's total, for progress bars) and ``losses``: every loss term and discriminator score
as a float (:func:`loss_terms` hands them to MLflow and to the non-finite-loss check).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.transforms import Randomizable
from torch.utils.data import Dataset

from medsr_monai.losses import AdversarialLoss

from .handlers import save_epoch_figure
from .weights import load_weights, save_weights

__all__ = ["SRGANTrainer", "CycleGANTrainer", "ImagePool", "UnpairedDataset", "loss_terms", "SRGANCheckpoints",
           "CycleGridHandler", "AuxiliaryPrediction", "LatestWeights", "load_weights", "save_weights"]

logger = logging.getLogger(__name__)

PIXEL_LOSSES = {"l1": torch.nn.L1Loss, "mse": torch.nn.MSELoss}


def loss_terms(output: Any) -> dict[str, float]:
    """The ``losses`` dict of a GAN trainer's output (MLflow / NaN-check ``output_transform``)."""
    out = output[0] if isinstance(output, list) else output
    return dict(out["losses"])


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ----------------------------------------------------------------------------------------------- SRGAN
class SRGANTrainer(Trainer):
    """SRGAN training (Ledig et al. 2017) with its pixel-loss pre-training phase in one Ignite run.

    Epochs ``1..pretrain_epochs`` train the generator with the pixel loss alone (that is SRResNet); later
    epochs alternate per iteration one discriminator step (real HR vs detached SR) and one generator step
    with ``pixel_weight * pixel + adversarial_weight * adversarial + feature_weight * feature``. One run,
    one checkpoint stream and one MLflow run cover both phases, so a run killed in either phase resumes
    where it stopped. ``pretrain_epochs=0`` starts adversarial at once (load a pre-trained generator first).

    Args:
        device, max_epochs, train_data_loader, epoch_length, non_blocking, prepare_batch: as in MONAI's
            ``SupervisedTrainer``; batches hold ``image`` (LR) and ``label`` (HR). (No mixed precision yet.)
        generator, discriminator: the two networks (discriminator outputs logits).
        g_optimizer, d_optimizer: their optimizers.
        pixel_loss: ``"l1"`` or ``"mse"``.
        adversarial_loss: ``bce`` (paper), ``ragan``, ``lsgan`` or ``hinge`` (:class:`AdversarialLoss`).
        pixel_weight, adversarial_weight, feature_weight: loss weights (the paper: MSE/VGG content loss plus
            1e-3 adversarial).
        feature_loss: ``(sr, hr) -> loss`` (e.g. :class:`~medsr_monai.losses.FeatureLoss`), or None.
        pretrain_epochs: epochs of pixel-only pre-training before the adversarial phase.
        train_handlers: MONAI/Ignite handlers.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader, generator: torch.nn.Module,
                 discriminator: torch.nn.Module, g_optimizer: torch.optim.Optimizer,
                 d_optimizer: torch.optim.Optimizer, pixel_loss: str = "l1", adversarial_loss: str = "bce",
                 pixel_weight: float = 1.0, adversarial_weight: float = 1e-3, feature_weight: float = 0.0,
                 feature_loss: Callable | None = None, pretrain_epochs: int = 0, epoch_length: int | None = None,
                 non_blocking: bool = False, prepare_batch: Callable = default_prepare_batch,
                 train_handlers: Sequence | None = None) -> None:
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss={pixel_loss!r}: choose one of {tuple(PIXEL_LOSSES)}")
        if not 0 <= pretrain_epochs <= max_epochs:
            raise ValueError(f"pretrain_epochs={pretrain_epochs} must be between 0 and max_epochs={max_epochs}")
        super().__init__(device=device, max_epochs=max_epochs, data_loader=train_data_loader,
                         epoch_length=epoch_length, non_blocking=non_blocking, prepare_batch=prepare_batch,
                         handlers=train_handlers, decollate=False)
        self.generator, self.discriminator = generator, discriminator
        self.network = generator  # what MONAI handlers (e.g. CheckpointSaver by name) expect to find
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.optimizer = g_optimizer  # MLFlowHandler logs this one's learning rate
        self.pixel_loss = PIXEL_LOSSES[pixel_loss]()
        self.adversarial = AdversarialLoss(adversarial_loss)
        self.pixel_weight, self.adversarial_weight = float(pixel_weight), float(adversarial_weight)
        self.feature_weight, self.feature_loss = float(feature_weight), feature_loss
        self.pretrain_epochs = int(pretrain_epochs)

    def is_adversarial(self, epoch: int | None = None) -> bool:
        return (self.state.epoch if epoch is None else epoch) > self.pretrain_epochs

    def _iteration(self, engine: SRGANTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        lr, hr = batch[0], batch[1]
        # PrepareBatchExtraInput adds (args, kwargs), e.g. the modality that picks a PhysicsSR generator's physics
        g_args, g_kwargs = (batch[2], batch[3]) if len(batch) > 3 else ((), {})
        g, d, adv = engine.generator, engine.discriminator, engine.adversarial
        adversarial = engine.is_adversarial()
        g.train()
        sr = g(lr, *g_args, **g_kwargs)
        terms: dict[str, torch.Tensor | float] = {"adversarial_phase": float(adversarial)}

        if adversarial:  # discriminator step on real HR vs the detached SR
            d.train()
            d.requires_grad_(True)
            engine.d_optimizer.zero_grad(set_to_none=True)
            real_logits, fake_logits = d(hr), d(sr.detach())
            d_loss = adv.discriminator(real_logits, fake_logits)
            d_loss.backward()
            engine.d_optimizer.step()
            terms.update(d_loss=d_loss.detach(), d_real=adv.real_score(real_logits),
                         d_fake=adv.real_score(fake_logits))
            d.requires_grad_(False)  # the generator step back-propagates through D without training it

        engine.g_optimizer.zero_grad(set_to_none=True)
        pixel = engine.pixel_loss(sr, hr)
        g_loss = engine.pixel_weight * pixel
        terms["g_pixel"] = pixel.detach()
        if adversarial:
            real_ref = None
            if adv.kind == "ragan":
                with torch.no_grad():
                    real_ref = d(hr)
            g_adv = adv.generator(real_ref, d(sr))
            g_loss = g_loss + engine.adversarial_weight * g_adv
            terms["g_adversarial"] = g_adv.detach()
            if engine.feature_loss is not None and engine.feature_weight > 0:
                g_feat = engine.feature_loss(sr, hr)
                g_loss = g_loss + engine.feature_weight * g_feat
                terms["g_feature"] = g_feat.detach()
        g_loss.backward()
        engine.g_optimizer.step()
        d.requires_grad_(True)
        terms["g_loss"] = g_loss.detach()
        losses = {k: float(v) for k, v in terms.items()}
        return {"image": lr, "label": hr, "pred": sr.detach(), "loss": g_loss.detach(), "losses": losses}


class SRGANCheckpoints:
    """Keep the generator of both SRGAN phases: ``srresnet.pt`` when pre-training ends (the pixel-loss
    SRResNet the adversarial phase starts from, and the PSNR reference of evaluation) and ``model.pt``
    after every epoch (the last one is the SRGAN).

    MONAI's ``CheckpointSaver`` picks checkpoints by a metric or an interval; selecting the adversarial
    generator by validation PSNR would pick the least adversarial one, and no saver knows the phases.
    With ``pretrain_epochs=0`` the generator at the start (the loaded pre-trained one) is ``srresnet.pt``.

    Args:
        generator: the generator network.
        ckpt_dir: where the two files go.
        pretrain_epochs: the trainer's pre-training epochs.
    """

    def __init__(self, generator: torch.nn.Module, ckpt_dir: str, pretrain_epochs: int,
                 pretrained_name: str = "srresnet.pt", final_name: str = "model.pt") -> None:
        self.generator, self.ckpt_dir, self.pretrain_epochs = generator, Path(ckpt_dir), int(pretrain_epochs)
        self.pretrained_path, self.final_path = self.ckpt_dir / pretrained_name, self.ckpt_dir / final_name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def started(self, engine: Engine) -> None:
        if _rank() == 0 and self.pretrain_epochs == 0 and not self.pretrained_path.exists():
            save_weights(self.generator, self.pretrained_path)

    def epoch_completed(self, engine: Engine) -> None:
        if _rank() != 0:
            return
        if engine.state.epoch == self.pretrain_epochs:
            save_weights(self.generator, self.pretrained_path)
            logger.info("pre-training done: SRResNet saved to %s", self.pretrained_path)
        save_weights(self.generator, self.final_path)


class LatestWeights:
    """Write each network's state dict to its own file after every epoch (rank 0), e.g. CycleGAN's
    ``model.pt`` (G_AB) and ``model_BA.pt`` (G_BA). GAN generators are kept as trained last, not selected by
    a validation metric; MONAI's ``CheckpointSaver`` writes one file per dict of objects, whereas inference
    loads one generator.

    Args:
        networks: ``{filename: network}``.
        ckpt_dir: folder of the files.
    """

    def __init__(self, networks: dict[str, torch.nn.Module], ckpt_dir: str) -> None:
        self.networks, self.ckpt_dir = dict(networks), Path(ckpt_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if _rank() == 0:
            for name, net in self.networks.items():
                save_weights(net, self.ckpt_dir / name)


class BestWeights(LatestWeights):
    """Write each network's state dict to its own file whenever the validation ``metric`` improves (rank 0);
    attach it to the evaluator. For CycleGAN with paired validation (simulated low dose on the validation
    patients): the adversarial game oscillates, so the last epoch is often not the best one; this keeps
    ``model.pt`` (G_AB) and ``model_BA.pt`` (G_BA) of the same, best epoch. MONAI's ``CheckpointSaver`` would put
    both generators in one file, whereas inference loads one.

    The start-of-training validation (epoch 0, the untrained generator) is never kept: shipped weights are
    learned ones. The best value and its epoch go to ``<ckpt_dir>/best_metric.json``, read back on resume so a
    resumed run does not overwrite a better epoch.

    Args:
        networks: ``{filename: network}``.
        ckpt_dir: folder of the files.
        metric: the evaluator's metric to maximise.
    """

    def __init__(self, networks: dict[str, torch.nn.Module], ckpt_dir: str, metric: str = "val_psnr") -> None:
        super().__init__(networks, ckpt_dir)
        self.metric, self.best, self.best_epoch = metric, float("-inf"), None

    @property
    def record(self) -> Path:
        return self.ckpt_dir / "best_metric.json"

    def attach(self, engine: Engine) -> None:
        if self.record.is_file():
            saved = json.loads(self.record.read_text())
            if saved.get("metric") == self.metric:
                self.best, self.best_epoch = float(saved["value"]), saved.get("epoch")
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.metric)
        if engine.state.epoch < 1 or value is None or not math.isfinite(float(value)) or float(value) <= self.best:
            return
        self.best, self.best_epoch = float(value), int(engine.state.epoch)
        super().__call__(engine)
        if _rank() == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.record.write_text(json.dumps({"metric": self.metric, "value": self.best, "epoch": self.best_epoch}))


class AuxiliaryPrediction:
    """Run a second network on each evaluation batch and store its output as a baseline key (e.g. the
    pixel-loss SRResNet beside SRGAN), so that :class:`SRMetricsHandler` scores both on the same slices.

    List it before the metrics handler in ``val_handlers``.

    Args:
        network: the second network (weights loaded from ``weights`` when given).
        key: batch key of its prediction.
        weights: optional state-dict file; a missing file disables the handler with a warning.
        input_key: batch key of the network input.
    """

    def __init__(self, network: torch.nn.Module, key: str = "srresnet", weights: str | None = None,
                 input_key: str = "image") -> None:
        self.network, self.key, self.input_key, self.weights = network, key, input_key, weights
        self.enabled = True

    def attach(self, engine: Engine) -> None:
        if self.weights:
            if not Path(self.weights).is_file():
                logger.warning("%s: %s not found; the %r column is skipped", type(self).__name__, self.weights,
                               self.key)
                self.enabled = False
                return
            load_weights(self.network, self.weights, what=f"{self.key} weights")
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        net = self.network.eval()
        batch = engine.state.batch
        device = next(net.parameters()).device
        takes_modality = hasattr(net, "physics")
        if isinstance(batch, dict):
            kw = {"modality": batch.get("modality")} if takes_modality else {}
            batch[self.key] = net(batch[self.input_key].to(device), **kw).clamp(0, 1)
        else:
            for item in batch:
                kw = {"modality": item.get("modality")} if takes_modality else {}
                item[self.key] = net(torch.as_tensor(item[self.input_key])[None].to(device), **kw)[0].clamp(0, 1)


# ----------------------------------------------------------------------------------------------- CycleGAN
class ImagePool:
    """History of generated images (Shrivastava et al. 2017, used by CycleGAN): once full, each query
    returns, with probability 1/2 per image, a stored older fake (replaced by the new one) instead of the
    new fake, so the discriminators do not chase the generators' latest mode.

    The ``torch.Generator`` state and the stored images are part of :meth:`state_dict`, so a resumed run
    continues with the same pool. Nothing in MONAI or Ignite provides this.

    Args:
        size: number of images kept (50 in CycleGAN; 0 disables the pool).
        seed: seed of the pool's random choices.
    """

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        self.size = int(size)
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(int(seed))

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size <= 0:
            return images
        out = []
        for img in images.detach():
            img = img[None]
            if len(self.images) < self.size:
                self.images.append(img.cpu())
                out.append(img)
            elif float(torch.rand(1, generator=self.generator)) < 0.5:
                j = int(torch.randint(self.size, (1,), generator=self.generator))
                old = self.images[j].to(img.device)
                self.images[j] = img.cpu()
                out.append(old)
            else:
                out.append(img)
        return torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        images = torch.cat(self.images) if self.images else torch.empty(0)
        return {"images": images, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        images = state["images"]
        self.images = [img[None] for img in images] if images.numel() else []
        self.generator.set_state(state["rng"])


class UnpairedDataset(Dataset, Randomizable):
    """Pairs item ``i`` of domain A with a random item of domain B (CycleGAN's unaligned sampling).

    Items of each dataset are dicts (or lists of dicts, e.g. from ``RandCropByPosNegLabeld`` with several
    samples); the output is ``{"A": a[image_key], "B": b[image_key]}`` (a list of them for lists). The length
    is that of the larger domain.

    Args:
        dataset_a, dataset_b: the two domains' datasets (e.g. MONAI ``CacheDataset`` with their transforms).
        image_key: key of the image in the items.
        seed: seed of the random B index.
    """

    def __init__(self, dataset_a: Dataset, dataset_b: Dataset, image_key: str = "image", seed: int = 0) -> None:
        if len(dataset_a) == 0 or len(dataset_b) == 0:
            raise ValueError(f"both domains need data: domain A has {len(dataset_a)} items, B {len(dataset_b)}")
        self.a, self.b, self.image_key = dataset_a, dataset_b, image_key
        self.set_random_state(seed)

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def randomize(self, data: Any = None) -> None:
        self._b_index = int(self.R.randint(len(self.b)))

    def __getitem__(self, index: int):
        self.randomize()
        a, b = self.a[index % len(self.a)], self.b[self._b_index]
        a_list, b_list = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
        pairs = [{"A": x[self.image_key], "B": y[self.image_key]} for x, y in zip(a_list, itertools.cycle(b_list))]
        return pairs if isinstance(a, list) else pairs[0]


class CycleGANTrainer(Trainer):
    """CycleGAN training (Zhu et al. 2017): per iteration one step of both generators, then one of both
    discriminators (on fakes drawn through :class:`ImagePool`).

    Generator loss: ``adv(D_B(G_AB(a))) + adv(D_A(G_BA(b))) + cycle_weight * (|G_BA(G_AB(a)) - a|_1 +
    |G_AB(G_BA(b)) - b|_1) + cycle_weight * identity_weight * (|G_AB(b) - b|_1 + |G_BA(a) - a|_1)`` (the
    identity term is scaled by the cycle weight, as in the authors' code). Discriminator loss per domain:
    ``(adv_real + adv_fake) / 2``. Like the authors' code, one optimizer updates both generators and one
    both discriminators.

    Args:
        device, max_epochs, train_data_loader, epoch_length, non_blocking: as in MONAI trainers; batches
            hold ``A`` and ``B`` (unpaired, e.g. from :class:`UnpairedDataset`). (No mixed precision yet.)
        g_ab, g_ba: generators A -> B and B -> A.
        d_a, d_b: discriminators of domain A and B (patch logits).
        g_optimizer, d_optimizer: optimizers of both generators / both discriminators.
        adversarial_loss: ``lsgan`` (paper) or another :class:`AdversarialLoss` kind.
        cycle_weight: lambda of the cycle loss (10).
        identity_weight: identity loss relative to the cycle weight (0.5).
        pool_size: image pool size (50).
        seed: seed of the image pools.
        pool_a, pool_b: the fake-image pools of domains A and B (created from ``pool_size`` and ``seed`` when
            not given; give them to checkpoint them with the rest of the training state).
        frequency_sigma: frequency separation (Fritsche et al., ICCVW 2019), off when 0. With a sigma (pixels)
            the discriminators see only the high-pass ``x - G_sigma * x`` of real and fake images, and a content
            loss ``content_weight * (|G_s(G_AB(a)) - G_s(a)|_1 + |G_s(G_BA(b)) - G_s(b)|_1)`` ties each output's
            low-pass to its input's. For denoising between patients this is the point: dose noise is high
            frequency and zero-mean, while what differs between the two domains' patients (anatomy, contrast,
            body size) is mostly low frequency; so the adversarial game is about noise texture only, and the
            generators cannot pay for realism by changing anatomy (what the plain losses did on the sample CTs).
        content_weight: weight of the low-pass content loss (used with ``frequency_sigma``).
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader, g_ab: torch.nn.Module,
                 g_ba: torch.nn.Module, d_a: torch.nn.Module, d_b: torch.nn.Module,
                 g_optimizer: torch.optim.Optimizer, d_optimizer: torch.optim.Optimizer,
                 adversarial_loss: str = "lsgan", cycle_weight: float = 10.0, identity_weight: float = 0.5,
                 pool_size: int = 50, seed: int = 0, pool_a: ImagePool | None = None, pool_b: ImagePool | None = None,
                 epoch_length: int | None = None, non_blocking: bool = False,
                 train_handlers: Sequence | None = None, frequency_sigma: float = 0.0,
                 content_weight: float = 10.0) -> None:
        super().__init__(device=device, max_epochs=max_epochs, data_loader=train_data_loader,
                         epoch_length=epoch_length, non_blocking=non_blocking, handlers=train_handlers,
                         decollate=False)
        if frequency_sigma < 0 or content_weight < 0:
            raise ValueError(f"frequency_sigma and content_weight must be >= 0, got {frequency_sigma}, {content_weight}")
        self.lowpass = None
        if frequency_sigma > 0:
            from monai.networks.layers import GaussianFilter

            self.lowpass = GaussianFilter(2, float(frequency_sigma)).to(device)
        self.content_weight = float(content_weight)
        self.g_ab, self.g_ba, self.d_a, self.d_b = g_ab, g_ba, d_a, d_b
        self.network = g_ab
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.optimizer = g_optimizer
        self.adversarial = AdversarialLoss(adversarial_loss)
        self.cycle_weight, self.identity_weight = float(cycle_weight), float(identity_weight)
        self.pool_a = pool_a if pool_a is not None else ImagePool(pool_size, seed)
        self.pool_b = pool_b if pool_b is not None else ImagePool(pool_size, seed + 1)
        self.l1 = torch.nn.L1Loss()

    def discriminator_view(self, x: torch.Tensor) -> torch.Tensor:
        """What the discriminators see: the image, or its high-pass with frequency separation."""
        return x if self.lowpass is None else x - self.lowpass(x)

    def _iteration(self, engine: CycleGANTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        dev = engine.state.device
        real_a = batchdata["A"].to(dev, non_blocking=engine.non_blocking).as_subclass(torch.Tensor)
        real_b = batchdata["B"].to(dev, non_blocking=engine.non_blocking).as_subclass(torch.Tensor)
        adv, l1 = engine.adversarial, engine.l1
        nets = (engine.g_ab, engine.g_ba, engine.d_a, engine.d_b)
        for n in nets:
            n.train()

        # generators (discriminators frozen: gradients flow through them to the fakes only)
        engine.d_a.requires_grad_(False)
        engine.d_b.requires_grad_(False)
        engine.g_optimizer.zero_grad(set_to_none=True)
        fake_b, fake_a = engine.g_ab(real_a), engine.g_ba(real_b)
        rec_a, rec_b = engine.g_ba(fake_b), engine.g_ab(fake_a)
        seen = engine.discriminator_view
        g_adv_ab = adv.generator(None, engine.d_b(seen(fake_b)))
        g_adv_ba = adv.generator(None, engine.d_a(seen(fake_a)))
        cyc_a, cyc_b = l1(rec_a, real_a), l1(rec_b, real_b)
        g_loss = g_adv_ab + g_adv_ba + engine.cycle_weight * (cyc_a + cyc_b)
        terms: dict[str, Any] = {"g_adv_ab": g_adv_ab, "g_adv_ba": g_adv_ba, "cycle_a": cyc_a, "cycle_b": cyc_b}
        if engine.lowpass is not None and engine.content_weight > 0:
            lp = engine.lowpass
            content_a, content_b = l1(lp(fake_b), lp(real_a)), l1(lp(fake_a), lp(real_b))
            g_loss = g_loss + engine.content_weight * (content_a + content_b)
            terms.update(content_a=content_a, content_b=content_b)
        if engine.identity_weight > 0:
            idt_b, idt_a = l1(engine.g_ab(real_b), real_b), l1(engine.g_ba(real_a), real_a)
            g_loss = g_loss + engine.cycle_weight * engine.identity_weight * (idt_a + idt_b)
            terms.update(identity_a=idt_a, identity_b=idt_b)
        g_loss.backward()
        engine.g_optimizer.step()

        # discriminators, on fakes from the history pools
        engine.d_a.requires_grad_(True)
        engine.d_b.requires_grad_(True)
        engine.d_optimizer.zero_grad(set_to_none=True)
        pooled_b, pooled_a = engine.pool_b.query(fake_b.detach()), engine.pool_a.query(fake_a.detach())
        real_b_logits, fake_b_logits = engine.d_b(seen(real_b)), engine.d_b(seen(pooled_b))
        real_a_logits, fake_a_logits = engine.d_a(seen(real_a)), engine.d_a(seen(pooled_a))
        d_b_loss = adv.discriminator(real_b_logits, fake_b_logits)
        d_a_loss = adv.discriminator(real_a_logits, fake_a_logits)
        (d_a_loss + d_b_loss).backward()
        engine.d_optimizer.step()
        terms.update(g_loss=g_loss, d_a_loss=d_a_loss, d_b_loss=d_b_loss,
                     d_b_real=adv.real_score(real_b_logits), d_b_fake=adv.real_score(fake_b_logits),
                     d_a_real=adv.real_score(real_a_logits), d_a_fake=adv.real_score(fake_a_logits))
        losses = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}
        return {"image": real_a, "pred": fake_b.detach(), "rec_A": rec_a.detach(), "B": real_b,
                "fake_A": fake_a.detach(), "rec_B": rec_b.detach(), "loss": g_loss.detach(), "losses": losses}


class CycleGridHandler:
    """At each epoch end, a PNG of the last batch's cycles: rows ``A | G_AB(A) | G_BA(G_AB(A))`` and
    ``B | G_BA(B) | G_AB(G_BA(B))`` (``num_images`` of each), in ``output_dir/cycle_epochNNNN.png`` and
    ``cycle_latest.png``.

    Args:
        output_dir: folder of the PNGs.
        num_images: rows per direction.
        names: display names of domains A and B.
    """

    def __init__(self, output_dir: str, num_images: int = 2, names: Sequence[str] = ("A", "B")) -> None:
        self.output_dir, self.num_images, self.names = Path(output_dir), int(num_images), tuple(names)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> Path | None:
        if _rank() != 0:
            return None
        out = engine.state.output
        if not isinstance(out, dict) or "rec_A" not in out:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        a, b = self.names
        rows = []
        for i in range(min(self.num_images, len(out["image"]))):
            rows.append([(a, out["image"][i]), (f"{a}->{b}", out["pred"][i]), (f"{a}->{b}->{a}", out["rec_A"][i])])
        for i in range(min(self.num_images, len(out["B"]))):
            rows.append([(b, out["B"][i]), (f"{b}->{a}", out["fake_A"][i]), (f"{b}->{a}->{b}", out["rec_B"][i])])
        fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
        for r, row in enumerate(rows):
            for c, (title, img) in enumerate(row):
                axes[r][c].imshow(img.detach().float().cpu()[0].numpy(), cmap="gray", vmin=0, vmax=1)
                axes[r][c].set_title(title, fontsize=9)
                axes[r][c].axis("off")
        return save_epoch_figure(fig, self.output_dir, "cycle", engine.state.epoch)



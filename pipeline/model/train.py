"""Train a split model, calibrate its exit, write the artifacts and report.

Reads top to bottom: load data -> build model -> joint training of exit and final classifier
(AdamW, cosine decay per step; a moving average of the weights, kept at the epoch best on
validation) -> predictions on validation and test -> threshold from the
calibration policy on validation -> artifacts, sweep CSV/PNG, metrics JSON, printed report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.model import calibrate as cal
from pipeline.model import ell_native
from pipeline.model import unfamiliar_fit as uf
from pipeline.model.artifacts import compute_model_id, load_model, save_artifacts, set_threshold
from pipeline.model.config import METRICS_FILE, Config, TrainConfig
from pipeline.floor.data import Dataset, Split, load_dataset
from pipeline.errors import ArtifactError, DataError
from pipeline.model.split_model import SplitModel, describe
from pipeline.floor.quantization import quantize_unsigned
from pipeline.floor.static_code import StaticCode
from pipeline.floor.unfamiliar import Unfamiliarity

__all__ = ["fit", "predict", "run", "calibrate_dir", "dataset", "stop_now", "METRICS_FILE"]

log = logging.getLogger(__name__)

SWEEP_CSV, SWEEP_PNG = "calibration.csv", "calibration.png"
RELIABILITY_PNG = "reliability.png"   # confidence vs accuracy, before and after temperature
EVAL_BATCH = 4096
# Early stopping never gives up sooner than this fraction of the schedule after the best
# epoch: the first epochs of a small set (15 steps each for 4 000 images) are too short and
# noisy for "the last third brought nothing" to mean the training is over.
MIN_PATIENCE = 0.05


def _pixels(split: Split) -> torch.Tensor:
    return torch.from_numpy(split.images).float().div_(255.0)  # (N, H*W) in [0, 1]


def dataset(cfg: Config) -> Dataset:
    """The config's data folder, split as its [train] section says."""
    t, m = cfg.train, cfg.model
    data = load_dataset(cfg.data.dir, t.val_fraction, t.seed, t.val_min, m.input_shape,
                        m.resize)
    outputs, needed = m.widths[-1], 1 + max(int(part.labels.max(initial=0))
                                            for part in (data.train, data.val, data.test))
    if needed > outputs or len(data.classes) < outputs:
        raise DataError(f"{cfg.data.dir} has {needed} classes but model {m.name} has "
                        f"{outputs} outputs (model.widths[-1]): set it to {needed}")
    return data


def fit(cfg: Config, data: Dataset,
        progress: bool | None = None) -> tuple[SplitModel, list[float]]:
    """Joint training: loss = exit_weight * CE(exit) + CE(final), for `train.steps` (or
    `train.epochs`); the weights returned are the moving average's (WeightAverage) at the
    epoch with the lowest validation objective (_validation_loss), stopping early where
    `train.patience` says (stop_now). Returns model, s/epoch; its attribute `epochs` says
    which epoch it kept (best, from 1), how many it ran of how many scheduled, whether and at
    which step it stopped early, and the validation objective after each epoch."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = SplitModel(cfg.model)
    x, y = _pixels(data.train), torch.from_numpy(data.train.labels)
    with torch.no_grad():   # per channel for convs, over all pixels for an MLP
        if model.head.convolutional:
            channels = cfg.model.input_shape[0]
            x_c = x.reshape(len(x), channels, -1).transpose(0, 1).reshape(channels, -1)
            mean, std = x_c.mean(1), x_c.std(1)
        else:
            mean, std = x.mean(), x.std()
        model.head.pixel_mean.copy_(mean)
        model.head.pixel_std.copy_(std)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = math.ceil(len(y) / t.batch_size)
    total = t.epochs * steps_per_epoch if t.epochs else t.steps
    epochs = math.ceil(total / steps_per_epoch)   # the last one may stop part way
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    gen = torch.Generator().manual_seed(t.seed)
    augmenting = t.augment != "none"
    average = WeightAverage(model, t.ema_decay) if t.ema_decay else None
    epoch_seconds = []
    best, best_loss, best_epoch, best_step = None, math.inf, 0, 0
    curve, stopped_at = [], None
    # progress None: a bar only on a terminal (tqdm's disable=None); a log file got 53
    # progress updates from a 6 s training
    bar = tqdm(total=total, disable=None if progress is None else not progress, unit="step",
               leave=False, desc=f"train {cfg.model.name}")
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(y), generator=gen)
        running = 0.0
        steps = min(steps_per_epoch, total - epoch * steps_per_epoch)
        for i in range(steps):
            idx = order[i * t.batch_size:(i + 1) * t.batch_size]
            batch = augment(x[idx], cfg.model.input_shape, t, gen) if augmenting else x[idx]
            exit_logits, features, final_logits = model.run(batch)
            loss = (t.exit_weight * F.cross_entropy(exit_logits, y[idx],
                                                    label_smoothing=t.label_smoothing)
                    + F.cross_entropy(final_logits, y[idx], label_smoothing=t.label_smoothing))
            if t.rate_weight:  # fewer, smaller activations code in fewer bits
                loss = loss + t.rate_weight * features.abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if average:
                average.update(model)
            running += loss.item()
            bar.update()
        epoch_seconds.append(time.perf_counter() - start)
        done = epoch * steps_per_epoch + steps
        with average.swapped_in(model) if average else contextlib.nullcontext():
            val_loss = _validation_loss(model.eval(), data.val, t)
            if val_loss <= best_loss:   # ties: the later, more trained one
                best_loss, best_epoch, best_step = val_loss, epoch + 1, done
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        curve.append(val_loss)
        bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{running / steps:.3f}",
                        val_loss=f"{val_loss:.4f}")
        if stop_now(t.patience, done, best_step, total):
            stopped_at = done
            log.info(f"{cfg.model.name}: stopped early at step {done} of {total} (epoch "
                     f"{epoch + 1} of {epochs}): no better validation objective since epoch "
                     f"{best_epoch}")
            break
    bar.close()
    model.load_state_dict(best)
    model.epochs = {"run": len(curve), "best": best_epoch, "scheduled": epochs,
                    "stopped_early": stopped_at is not None, "stopped_at_step": stopped_at,
                    "scheduled_steps": total, "val_objective": curve}
    return model.eval(), epoch_seconds


def stop_now(patience: float, done: int, best_step: int, total: int) -> bool:
    """Whether training stops after `done` of `total` steps, the best epoch having ended at
    step `best_step`: once the last `patience` of the steps so far (and at least MIN_PATIENCE
    of the schedule) found no better validation objective. Relative to the steps so far: a
    plateau that is a third of all the training so far says the model has learned what it
    will, a few epochs' one early on (high learning rate, a young average) is noise. The
    weights kept are the best epoch's either way, so a stop changes
    the model only where a later epoch would have beaten it."""
    if not patience or done >= total:
        return False
    return done - best_step >= max(patience * done, MIN_PATIENCE * total)


def augment(pixels: torch.Tensor, shape, t: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """A batch (B, C*H*W) flipped left-right at random and/or moved by up to t.shift pixels
    (zeros fill in), each frame its own draw from `gen`: the same picture never looks the
    same twice, which is what keeps a conv net from learning the training set by heart."""
    x = pixels.reshape(-1, *shape)
    n, _, h, w = x.shape
    if "flip" in t.augment:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if "shift" in t.augment and t.shift:
        s = t.shift
        padded = F.pad(x, (s, s, s, s))
        dy, dx = (torch.randint(0, 2 * s + 1, (n,), generator=gen) for _ in range(2))
        rows = (dy[:, None] + torch.arange(h))[:, :, None]          # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]          # (B, 1, W)
        x = padded[torch.arange(n)[:, None, None], :, rows, cols]   # (B, H, W, C)
        x = x.permute(0, 3, 1, 2)
    return x.reshape(n, -1)


class WeightAverage:
    """An exponential moving average of the weights (Polyak averaging), which is what is
    evaluated and kept: it smooths the last steps' noise, which decides the epoch picked on
    a small validation set (3 subsets x 3 seeds of 4 000 images: paper-sparse 79.87 -> 80.31 %,
    its dense twin 82.29 -> 82.89 %). The decay ramps up as TensorFlow's
    ExponentialMovingAverage(num_updates) does, 1 - 9 / (10 + n): the average spans about
    the last ninth of the n steps so far, and never remembers the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.params = [p for p in model.parameters()]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - decay)

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """The model holds the average inside the block, its own weights again after."""
        with torch.no_grad():
            own = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.average):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, o in zip(self.params, own):
                    p.copy_(o)


@torch.inference_mode()
def _validation_loss(model: SplitModel, split: Split, t: TrainConfig) -> float:
    """The training objective on validation: the exit's and the final classifier's
    cross-entropy, and the features' rate where it is trained for. A loss, not the accuracy:
    on a few hundred validation frames accuracy moves in steps of a frame, and the best of
    hundreds of such noisy epochs is a late, overfit one more often than the best model
    (dense twin, 3 subsets x 3 seeds of 4 000 images: 82.60 +- 0.83 % kept by accuracy,
    83.19 +- 0.36 % by loss). `train.select_by`: the cross-entropy after each classifier's
    temperature (calibrated_loss, as the model ships: a tail growing overconfident is what
    its temperature corrects, while the features it is sent keep getting cheaper), or as
    trained (loss: stops earlier, which suits a net with nothing but accuracy to gain)."""
    x, labels = _pixels(split), split.labels
    exits, finals, rate = [], [], 0.0
    for i in range(0, len(x), EVAL_BATCH):
        exit_logits, features, final_logits = model.run(x[i:i + EVAL_BATCH])
        exits.append(exit_logits)
        finals.append(final_logits)
        rate += float(features.abs().mean(1).sum())
    nll = cal.calibrated_nll if t.select_by == "calibrated_loss" else cal.nll
    return (t.exit_weight * nll(torch.cat(exits).numpy(), labels)
            + nll(torch.cat(finals).numpy(), labels) + t.rate_weight * rate / len(x))


@torch.inference_mode()
def predict(model: SplitModel, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """(exit logits, final logits) for every frame of a split."""
    x = _pixels(split)
    outs = [model(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _evaluate(logits: tuple[torch.Tensor, torch.Tensor], split: Split, score: str,
              temperature: float):
    exit_logits, final_logits = logits
    labels = torch.from_numpy(split.labels)
    return (cal.exit_scores(exit_logits, score, temperature),
            (exit_logits.argmax(1) == labels).numpy(),
            (final_logits.argmax(1) == labels).numpy())


def _calibrate(model: SplitModel, cfg: Config, data: Dataset, out_dir: Path
               ) -> tuple[dict, tuple[Unfamiliarity, Unfamiliarity]]:
    """Fit the exit's and the tail's temperatures on validation, choose the threshold on the
    calibrated validation scores, write the sweep and the reliability diagram, measure the
    choice on test; fit both unfamiliarity scores (pipeline.model.unfamiliar_fit)."""
    c = cfg.calibrate
    val_logits, test_logits = predict(model, data.val), predict(model, data.test)
    quality = {name: cal.calibration_quality(val_logits[i].numpy(), data.val.labels,
                                             test_logits[i].numpy(), data.test.labels)
               for i, name in enumerate(("exit", "final"))}
    temperature = quality["exit"]["temperature"]
    val_scores, val_exit, val_final = _evaluate(val_logits, data.val, c.score, temperature)
    result = cal.sweep(val_scores, val_exit, val_final)
    threshold = cal.choose_threshold(result, c)
    cal.write_csv(out_dir / SWEEP_CSV, result)
    plotted = cal.write_plot(out_dir / SWEEP_PNG, result, threshold,
                             f"{cfg.model.name}: exit threshold sweep ({c.score})")
    val_acc, val_offload = cal.split_accuracy(val_scores, val_exit, val_final, threshold)
    test_scores, test_exit, test_final = _evaluate(test_logits, data.test, c.score,
                                                   temperature)
    test_acc, test_offload = cal.split_accuracy(test_scores, test_exit, test_final, threshold)
    reliability = cal.write_reliability_plot(
        out_dir / RELIABILITY_PNG, {name: (test_logits[i].numpy(), quality[name]["temperature"])
                                    for i, name in enumerate(("exit", "final"))},
        data.test.labels, f"{cfg.model.name}: confidence vs accuracy (test)")
    policy = (f"offload {c.target_offload:.0%}" if c.policy == "offload"
              else f"max drop {c.max_drop} points")
    unfamiliar = uf.fit_scores(model, data.train,
                               uf.activations(model, uf.pixels_of(data.val)), c)
    return {
        "threshold": threshold, "score": c.score, "policy": policy,
        "sweep_csv": SWEEP_CSV, "sweep_png": SWEEP_PNG if plotted else None,
        "reliability_png": RELIABILITY_PNG if reliability else None,
        "validation": {"exit_only": result.exit_accuracy, "full": result.full_accuracy,
                       "split_exit": val_acc, "offload_ratio": val_offload},
        "test": {"exit_only": float(test_exit.mean()), "full": float(test_final.mean()),
                 "split_exit": test_acc, "offload_ratio": test_offload},
        # how well confidence matches accuracy, before and after each temperature; the
        # threshold above is on the exit's calibrated score
        "confidence": quality,
        # frames unlike the training set: what each score flags, on test and on shifts
        "unfamiliar": uf.report(model, data.test, threshold,
                                lambda z: cal.exit_scores(z, c.score, temperature),
                                *unfamiliar),
    }, unfamiliar


def temperatures(calibration: dict) -> tuple[float, float]:
    """(exit, tail) temperatures that a calibration fitted."""
    q = calibration["confidence"]
    return q["exit"]["temperature"], q["final"]["temperature"]


@torch.inference_mode()
def uplink_code(model: SplitModel, split: Split) -> StaticCode:
    """The static entropy code of the uplink, fitted on the training frames' codes."""
    bits = model.cfg.uplink_bits
    features = torch.cat([model.head(x)[1] for x in _pixels(split).split(EVAL_BATCH)])
    codes, _ = quantize_unsigned(features.numpy(), bits)
    return StaticCode.fit(codes, 1 << bits)


def _structure(model: SplitModel) -> dict:
    head, tail = describe(model.head), describe(model.tail)
    # Head layers after the exit's (a bottleneck) run only for the frames sent up.
    uplink = describe(model.head.layers[model.head.exit_layer:])
    return {"head": head, "tail": tail,
            "edge_params": sum(r["params"] for r in head),
            "server_params": sum(r["params"] for r in tail),
            "edge_macs": sum(r["macs"] for r in head),
            "uplink_macs": sum(r["macs"] for r in uplink),
            "server_macs": sum(r["macs"] for r in tail)}


def run(cfg: Config, out_dir: Path, progress: bool | None = None) -> dict:
    """The whole `splitexit train`: returns (and writes) the metrics dict."""
    data = dataset(cfg)
    log.info(f"{cfg.model.name}: {len(data.train)} train / {len(data.val)} validation / "
             f"{len(data.test)} test frames from {cfg.data.dir}; sparse layers train with "
             f"{ell_native.status()}")
    model, epoch_seconds = fit(cfg, data, progress)
    epochs = dict(model.epochs)
    curve = epochs.pop("val_objective")   # its own key: train_epochs stays one short line
    out_dir.mkdir(parents=True, exist_ok=True)
    calibration, unfamiliar = _calibrate(model, cfg, data, out_dir)
    code = uplink_code(model, data.train) if cfg.model.uplink_bits else None
    sizes = save_artifacts(out_dir, model, cfg, calibration["threshold"],
                           data.classes[:cfg.model.widths[-1]], code,
                           temperatures(calibration), unfamiliar)
    metrics = {"model": cfg.model.name, "model_id": sizes["model_id"],
               "config": cfg.to_dict(), "structure": _structure(model),
               "artifact_bytes": {"edge": sizes["edge_bytes"], "server": sizes["server_bytes"]},
               "train_seconds_per_epoch": float(np.mean(epoch_seconds)),
               "train_seconds": float(np.sum(epoch_seconds)),
               "train_epochs": epochs, "train_val_objective": curve,
               "train_threads": torch.get_num_threads(),
               "train_kernels": ell_native.status(),
               "calibration": calibration}
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def calibrate_dir(out_dir: Path, cfg: Config, data_dir: str | None = None) -> dict:
    """Re-run calibration of a trained directory with a new policy; rewrites edge.pt."""
    model, edge, _ = load_model(out_dir)
    if data_dir:
        cfg.data.dir = data_dir
    data = dataset(cfg)
    if compute_model_id(model, edge.layout) != edge.model_id:
        raise ArtifactError(f"{edge.path}: stored model id {edge.model_id} does not match its "
                            f"weights; re-create the directory with `splitexit train`")
    calibration, unfamiliar = _calibrate(model, cfg, data, out_dir)
    set_threshold(out_dir, calibration["threshold"], cfg.calibrate.score,
                  temperatures(calibration), unfamiliar)
    metrics_path = out_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["calibration"] = calibration
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics

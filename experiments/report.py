"""What a training run reports: a progress bar, a log line per epoch, ``metrics.jsonl`` and
TensorBoard scalars (process 0), and the error of a diverged run."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import tensorboardX
from absl import logging
from tqdm import tqdm

from experiments import TrainingDiverged, checkpoints, parallel

SUMMARIES_NAME = "tensorboard"  # WORKDIR/tensorboard: TensorBoard event files
SUMMARY_TAGS = {  # record field -> TensorBoard tag
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "test_loss": "test/loss",
    "test_accuracy": "test/accuracy",
    "learning_rate": "learning_rate",
    "images_per_second": "images_per_second",
}


class Report:
    """What a run reports: the progress bar, the log lines, ``metrics.jsonl`` and TensorBoard
    (process 0), and the divergence guard, which names the last good checkpoint."""

    def __init__(self, config, store: checkpoints.Checkpoints, start_epoch: int, steps: int):
        self.config, self.store, self.steps = config, store, steps
        self.main_process = parallel.is_main_process()
        self.bar = tqdm(
            total=config.num_epochs * steps,
            initial=start_epoch * steps,
            desc=f"{config.optimizer} {config.model} {config.dataset}",
            unit="step",
            disable=not (config.progress_bar and self.main_process),
            dynamic_ncols=True,
        )
        # TensorBoard: one scalar per record field and epoch (process 0). purge_step makes
        # TensorBoard drop what an interrupted run wrote after the checkpoint it resumes from.
        self.summaries = tensorboardX.SummaryWriter(
            str(store.workdir / SUMMARIES_NAME),
            purge_step=start_epoch + 1,
            write_to_disk=self.main_process,
        )

    def progress(self, epoch: int, last: dict[str, Any], rate: float, records) -> None:
        """The progress bar's figures: the last step's, the speed, the last test accuracy."""
        self.bar.set_postfix(
            epoch=epoch + 1,
            loss=f"{last['loss']:.4f}",
            acc=f"{last['accuracy']:.3f}",
            img_s=f"{rate:.0f}",
            test_acc=f"{records[-1]['test_accuracy']:.4f}" if records else "-",
            refresh=False,
        )

    def epoch(self, epoch, step_metrics, test_metrics, learning_rate, epoch_time) -> dict:
        """The record of ``epoch`` (0-based), also logged above the progress bar."""
        applied = [m for m in step_metrics if not m["skipped"]] or step_metrics
        record = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * self.steps,
            "learning_rate": float(learning_rate),
            "train_loss": float(np.mean([m["loss"] for m in applied])),
            "train_accuracy": float(np.mean([m["accuracy"] for m in applied])),
            "test_loss": float(test_metrics["loss"]),
            "test_accuracy": float(test_metrics["accuracy"]),
            "skipped_steps": int(sum(m["skipped"] for m in step_metrics)),
            "train_time": epoch_time,
            "images_per_second": self.steps * self.config.batch_size / epoch_time,
        }
        with tqdm.external_write_mode(file=sys.stderr):
            logging.info(
                "epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | lr %.4g",
                record["epoch"],
                self.config.num_epochs,
                record["train_loss"],
                record["train_accuracy"],
                record["test_loss"],
                record["test_accuracy"],
                record["learning_rate"],
            )
        return record

    def write(self, record: dict[str, Any]) -> None:
        """The epoch's line of ``metrics.jsonl`` and its TensorBoard scalars."""
        if self.main_process:
            checkpoints.append_metrics(self.store.workdir / checkpoints.METRICS_NAME, record)
        for key, tag in SUMMARY_TAGS.items():
            self.summaries.add_scalar(tag, record[key], record["epoch"])
        self.summaries.flush()

    def close(self) -> None:
        self.summaries.close()
        self.bar.close()

    def stop_if_diverged(self, step_metrics, epoch: int) -> None:
        """Raises ``TrainingDiverged`` at the first step of this epoch that left a non-finite
        loss or state."""
        bad = next((i for i, m in enumerate(step_metrics) if m["finite"] < 1), None)
        if bad is not None:
            what = "loss" if not np.isfinite(step_metrics[bad]["loss"]) else "parameters"
            step = epoch * self.steps + bad + 1
            raise self.diverged(f"at epoch {epoch + 1}, step {step} (non-finite {what})")

    def diverged(self, where: str) -> TrainingDiverged:
        """The error of a diverged run, naming the last good checkpoint (kept)."""
        self.bar.close()
        self.store.finish()
        epochs = self.store.epochs()
        kept = (
            f"the last good checkpoint, {self.store.directory / str(epochs[-1])} (epoch "
            f"{epochs[-1]}), is kept: lower --config.learning_rate (or the radii) and rerun "
            f"with --resume --allow_changes=learning_rate"
            if epochs
            else "no checkpoint was written yet: lower --config.learning_rate (or the radii) "
            "and rerun with --overwrite"
        )
        return TrainingDiverged(
            f"training diverged {where}; {kept}, or set --config.skip_nonfinite_steps=N to "
            f"skip non-finite steps."
        )


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(__spec__, "python -m experiments.train", "what a training run reports")

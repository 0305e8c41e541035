"""``train_results.json`` and the line that tells a stopped run how to go on.

The results file is rewritten atomically after every epoch and at the end, so a run stopped at
any moment leaves the history of its finished epochs (``utils/atomic_io.py``).
"""
import json
import os

from ..utils.atomic_io import write_text_atomic


def write_results(output_dir, state, verdict=None, diverged_at=None, stopped_by=None,
                  stopped_early=None):
    os.makedirs(output_dir, exist_ok=True)
    data = {"epochs": state.history, "best_epoch": state.best_epoch,
            "best_top1": state.best_top1 if state.best_known else None,
            "diverged_at": diverged_at, "stopped_by": stopped_by, "stopped_early": stopped_early,
            "diagnosis": verdict}
    return write_text_atomic(os.path.join(output_dir, "train_results.json"),
                             json.dumps(data, indent=2))


def resume_hint(output_dir, state, epochs):
    """What to run after a stop: ``latest`` holds the last finished epoch (saves are per epoch)."""
    if state.epoch == 0:
        return "no epoch had finished, so no checkpoint was written; run again to start over"
    latest = os.path.join(output_dir, "latest")
    return (f"{latest} holds epoch {state.epoch} of {epochs}; resume with "
            f"-o Global.checkpoints={latest} or -o Global.auto_resume=True")

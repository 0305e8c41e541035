"""A short verdict on a finished run, read from its curves, with the config keys to turn.

Inputs are the per-epoch records the Trainer writes to ``train_results.json`` (``train_loss``,
``train_top1`` (None while Mixup/Cutmix is on), ``eval_top1``, ``eval_loss``). The rules are the
ones practitioners apply by eye, made explicit so a user gets the same reading every time:

- diverged: a NaN/inf loss stopped the run (the Trainer passes ``diverged_at``);
- over-fitting: train accuracy well above eval accuracy (gap > ``GAP``), or eval accuracy fell
  clearly below its best while train accuracy kept rising;
- under-fitting: train accuracy itself is low (< ``LOW_TRAIN``) and close to eval accuracy;
- still improving: the best eval accuracy is in the last epoch and rose by > ``RISING`` over the
  last two epochs;
- otherwise a good fit.
"""

GAP = 0.15          # train top-1 - eval top-1 beyond this is over-fitting (15 points)
LOW_TRAIN = 0.60    # train top-1 below this with a small gap is under-fitting
RISING = 0.01       # eval top-1 still rising by more than 1 point per 2 epochs
DROP = 0.03         # eval top-1 this far below its best at the end is a sign of over-fitting

ADVICE = {
    "overfitting": [
        "raise weight decay: Optimizer.regularizer.coeff (Momentum) or Optimizer.weight_decay (AdamW)",
        "augment more: DataLoader.Train.dataset.batch_transform_ops (MixupOperator/CutmixOperator) or "
        "TimmAutoAugment in transform_ops",
        "smooth labels: Loss.Train.0.CELoss.epsilon: 0.1",
        "train fewer epochs (Global.epochs) or keep best_model, or freeze more: "
        "FineTune.freeze_backbone_epochs / FineTune.layer_decay",
    ],
    "underfitting": [
        "train longer: Global.epochs",
        "raise the learning rate: Optimizer.lr.learning_rate (x2 to x3)",
        "weaken regularisation: lower Optimizer.regularizer.coeff / Optimizer.weight_decay, remove "
        "batch_transform_ops, lower Loss.Train.0.CELoss.epsilon",
        "unfreeze the backbone: FineTune.linear_probe: False / smaller FineTune.freeze_backbone_epochs",
    ],
    "still_improving": [
        "train longer: Global.epochs (eval accuracy was still rising in the last epochs)",
    ],
    "diverged": [
        "lower the learning rate: Optimizer.lr.learning_rate (÷3 to ÷10)",
        "warm up longer: Optimizer.lr.warmup_epoch",
        "clip gradients: Optimizer.clip_norm: 5.0",
    ],
    "good_fit": [],
}


def early_stop(history, glob):
    """Why to stop now, or None: ``Global.early_stop_patience`` evaluations in a row without a
    val top-1 gain of at least ``Global.early_stop_min_delta`` (default 0) over the best so far.
    A pure function of the history, so a resumed run stops where the uninterrupted one would."""
    patience = glob.get("early_stop_patience")
    if not patience:
        return None
    delta = float(glob.get("early_stop_min_delta") or 0.0)
    ref, ref_epoch, stale = None, None, 0
    for r in history:
        v = r.get("eval_top1")
        if v is None:
            continue
        if ref is None or v > ref + delta:
            ref, ref_epoch, stale = v, r["epoch"], 0
        else:
            stale += 1
    if stale < int(patience):
        return None
    return (f"val top-1 did not improve by more than {delta:g} over {ref:.4f} (epoch {ref_epoch}) "
            f"in {stale} evaluations (Global.early_stop_patience {patience}); best_model is the "
            "best epoch")


def diagnose(history, diverged_at=None, stopped=None):
    """Return ``{"verdict", "reason", "advice"}`` from the per-epoch records; ``stopped`` (the
    early-stop reason) is prefixed to the reason."""
    out = _diagnose(history, diverged_at)
    if stopped:
        out["reason"] = f"stopped early: {stopped}. {out['reason']}"
        out["stopped_early"] = True
    return out


def _diagnose(history, diverged_at):
    if diverged_at is not None:
        return _verdict("diverged", f"loss became NaN/inf at {diverged_at}; the last good "
                                    "checkpoint is output_dir/latest")
    evals = [r for r in history if r.get("eval_top1") is not None]
    if not evals:
        return _verdict("unknown", "no evaluation ran (Global.eval_during_train is off or no "
                                   "DataLoader.Eval); nothing to compare")
    last = evals[-1]
    best = max(r["eval_top1"] for r in evals)
    train = last.get("train_top1")
    val = last["eval_top1"]
    if train is not None and train - val > GAP:
        return _verdict("overfitting", f"train top-1 {train:.3f} is {train - val:.3f} above eval "
                                       f"top-1 {val:.3f}")
    if len(evals) >= 3 and best - val > DROP:
        return _verdict("overfitting", f"eval top-1 fell from its best {best:.3f} to {val:.3f}")
    if train is not None and train < LOW_TRAIN and train - val <= GAP:
        return _verdict("underfitting", f"train top-1 is only {train:.3f} (eval {val:.3f}): the "
                                        "model does not fit even the training data")
    if train is None and len(history) >= 2 and history[-1]["train_loss"] > 0.98 * history[0]["train_loss"]:
        return _verdict("underfitting", "train loss barely fell over the run")
    if len(evals) >= 2 and val >= best and val - evals[max(0, len(evals) - 3)]["eval_top1"] > RISING:
        return _verdict("still_improving", f"eval top-1 reached its best {val:.3f} in the last epoch "
                                           "and was still rising")
    gap = "" if train is None else f", train {train:.3f}"
    return _verdict("good_fit", f"eval top-1 {val:.3f} (best {best:.3f}){gap}")


def _verdict(name, reason):
    return {"verdict": name, "reason": reason, "advice": list(ADVICE.get(name, []))}


def format_diagnosis(d):
    lines = [f"Diagnosis: {d['verdict'].replace('_', ' ')} — {d['reason']}"]
    lines += [f"  - {a}" for a in d["advice"]]
    return "\n".join(lines)

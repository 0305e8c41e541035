"""The end-of-training verdict follows the curves."""
from ppcls_ft.engine.diagnosis import diagnose, format_diagnosis


def rec(epoch, train_loss, train_top1, eval_top1):
    return {"epoch": epoch, "train_loss": train_loss, "train_top1": train_top1, "eval_top1": eval_top1}


def test_overfitting_when_train_far_above_eval():
    d = diagnose([rec(1, 1.0, 0.7, 0.6), rec(2, 0.3, 0.95, 0.7), rec(3, 0.1, 0.99, 0.72)])
    assert d["verdict"] == "overfitting"
    assert any("regularizer.coeff" in a or "weight_decay" in a for a in d["advice"])


def test_overfitting_when_eval_falls_from_best():
    d = diagnose([rec(1, 1.0, None, 0.80), rec(2, 0.6, None, 0.85), rec(3, 0.4, None, 0.78)])
    assert d["verdict"] == "overfitting" and "fell" in d["reason"]


def test_underfitting_when_train_accuracy_low():
    d = diagnose([rec(1, 1.6, 0.30, 0.28), rec(2, 1.5, 0.35, 0.33)])
    assert d["verdict"] == "underfitting"
    assert any("Global.epochs" in a for a in d["advice"])


def test_still_improving_when_best_is_last_and_rising():
    d = diagnose([rec(1, 1.0, 0.80, 0.70), rec(2, 0.8, 0.85, 0.78), rec(3, 0.6, 0.88, 0.84)])
    assert d["verdict"] == "still_improving"


def test_good_fit_and_diverged_and_no_eval():
    flat = [rec(1, 0.5, 0.92, 0.90), rec(2, 0.45, 0.93, 0.905), rec(3, 0.44, 0.93, 0.905)]
    assert diagnose(flat)["verdict"] == "good_fit"
    d = diagnose(flat, diverged_at="epoch 2, iteration 3")
    assert d["verdict"] == "diverged" and "epoch 2" in d["reason"]
    assert "Diagnosis: diverged" in format_diagnosis(d)
    assert diagnose([{"epoch": 1, "train_loss": 1.0}])["verdict"] == "unknown"

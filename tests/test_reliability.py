"""benchmarks/reliability.py still runs and still judges: a handful of its cases end to end, and
its verdicts on made-up outcomes (the full table is docs/reliability.md, made by the script)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("reliability", REPO / "benchmarks" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOKE = ["unknown_global_key", "line_without_label", "decompression_bomb", "file_too_large",
         "double_run", "infer_corrupt"]


def test_a_handful_of_cases_run_and_pass(tmp_path):
    rel = load_script()
    out = tmp_path / "reliability.md"
    results, totals = rel.main(["--only", *SMOKE, "--out", str(out), "--jobs", "2"])
    assert [r.case.name for r in results] == SMOKE
    for r in results:
        assert not r.skipped and not r.flags, (r.case.name, r.code, r.message, r.flags)
    assert totals["cases"] == 6 and totals["ok"] == 6 and totals["silent"] == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line[:3] in {f"| {i}" for i in range(1, 10)}]
    assert "**Totals:** cases: 6" in text and len(rows) == 6
    bomb = next(r for r in results if r.case.name == "decompression_bomb")
    assert bomb.code == 0 and "above DecodeImage.max_pixels" in bomb.message
    efbig = next(r for r in results if r.case.name == "file_too_large")
    assert efbig.code == 2 and efbig.earlier.endswith("files identical")


class FakeProc:
    def __init__(self, code, stdout="", stderr="", job=None):
        self.popen = type("P", (), {"returncode": code})()
        self.stdout, self.stderr, self.problem, self.snapshot = stdout, stderr, None, None
        self.job = job


def test_judge_flags_silent_tracebacks_and_unclear_errors(tmp_path):
    rel = load_script()
    job = rel.Job(argv=[])
    error_case = rel.Case("x", "config", "x", "error", None, needle="Global.epochs")
    assert rel.judge(error_case, FakeProc(0, job=job), None, {}).flags[0] == "silent"
    tb = "Traceback (most recent call last):\n  File ...\nKeyError: 'epochs'\n"
    flags = rel.judge(error_case, FakeProc(1, stderr=tb, job=job), None, {}).flags
    assert "traceback" in flags and "unclear" in flags
    good = rel.judge(error_case, FakeProc(2, stderr="error: Global.epochs: bad\n", job=job), None, {})
    assert good.flags == [] and good.message == "error: Global.epochs: bad"
    warn_case = rel.Case("y", "data", "y", "warn", None)
    assert rel.judge(warn_case, FakeProc(0, stdout="[t] INFO fine\n", job=job), None, {}).flags == ["silent"]


def test_the_script_runs_from_the_command_line(tmp_path):
    out = tmp_path / "r.md"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reliability.py"), "--only",
                           "no_config_argument", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "cases 1" in done.stdout and "| 1 | config |" in out.read_text()

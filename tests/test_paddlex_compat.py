"""An exported directory loads in PaddleX and gives our Predictor's top-1 and scores.

PaddleX (``pip install "paddlex[cv]==3.7.2" paddlepaddle==3.3.1``) pins packages of its own, so
it lives in a venv of its own; point ``PPCLS_FT_PADDLEX_PYTHON`` at that venv's python. Without it
(the default ``make test``) the test skips and says so. Slow: PaddleX imports for ~10 s.
"""
import json
import os
import subprocess

import pytest
import yaml

from ppcls_ft.predictor import Predictor
from test_export import mobilenet_export, real_images  # noqa: F401  (mobilenet_export: a fixture)

PADDLEX_SCRIPT = """
import json, sys
import numpy as np
from paddlex import create_model
model_dir, name, images = sys.argv[1], sys.argv[2], sys.argv[3:]
model = create_model(model_name=name, model_dir=model_dir, device="cpu")
out = []
for res in model.predict(images, batch_size=1):
    ids, scores = np.asarray(res["class_ids"]).reshape(-1), np.asarray(res["scores"]).reshape(-1)
    out.append({"class_ids": [int(c) for c in ids[:3]], "scores": [float(s) for s in scores[:3]]})
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def paddlex_python():
    python = os.environ.get("PPCLS_FT_PADDLEX_PYTHON")
    if not python or not os.path.isfile(python):
        pytest.skip("PaddleX not configured: set PPCLS_FT_PADDLEX_PYTHON to a python with "
                    "paddlex[cv] 3.x installed (it needs its own venv)")
    return python


def test_paddlex_loads_the_export_with_the_same_top1(shared, mobilenet_export, paddlex_python):
    images = real_images(shared)
    name = yaml.safe_load((mobilenet_export / "inference.yml").read_text())["Global"]["model_name"]
    assert name == "MobileNetV2_x1_0"  # PaddleX's spelling, which create_model checks
    proc = subprocess.run([paddlex_python, "-c", PADDLEX_SCRIPT, str(mobilenet_export), name, *images],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    theirs = json.loads(line[len("RESULT "):])
    ours = Predictor(mobilenet_export, batch_size=4).predict(images)
    assert len(theirs) == len(ours) == 4
    for t, o in zip(theirs, ours):
        assert t["class_ids"] == o["class_ids"][:3]
        assert t["scores"] == pytest.approx(o["scores"][:3], abs=1e-4)

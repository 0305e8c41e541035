"""tools/train.py, except rank 1 dies (exit 1) when epoch 2 starts, once (a marker file remembers):
a worker lost mid-job, for the launcher's elastic restart to recover from."""
import os
import sys
from pathlib import Path

import paddle.distributed as pdist

from ppcls_ft.engine import trainer as trainer_module

MARKER = Path(sys.argv.pop(1))
_train_epoch = trainer_module.Trainer.train_epoch


def train_epoch(self, epoch):
    if epoch == 2 and pdist.get_rank() == 1 and not MARKER.exists():
        MARKER.write_text("crashed once\n")
        os._exit(1)
    return _train_epoch(self, epoch)


trainer_module.Trainer.train_epoch = train_epoch
sys.argv[0] = "tools/train.py"
from ppcls_ft.engine.cli import run_cli  # noqa: E402
from ppcls_ft.engine.run import train  # noqa: E402

result = run_cli("train, crashing once", train)
sys.exit(3 if result["diverged_at"] else 0)

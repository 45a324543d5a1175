"""Entry point for the torchrun tests: the CLI's `train`, recording which ranks write checkpoints."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainer_core.train.loop as loop  # noqa: E402
from trainer_core.cli import main  # noqa: E402

_real_save = loop.save_checkpoint


def _recording_save(*args, **kwargs):
    record = Path(os.environ["WRITES_LOG"])
    with open(record, "a") as fh:
        fh.write(f"{os.environ.get('RANK', '0')}\n")
    return _real_save(*args, **kwargs)


loop.save_checkpoint = _recording_save
sys.exit(main(sys.argv[1:]))

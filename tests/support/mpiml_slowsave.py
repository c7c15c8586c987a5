"""`python -m mpiml_slowsave ARGS...`: `python -m mpiml.train ARGS...` whose Nth checkpoint
save stops half-way, with files in the temporary folder and no commit marker, so a test can
SIGKILL the whole job exactly while a checkpoint is being written.

MPIML_SLOWSAVE_AT=N picks the save; MPIML_SLOWSAVE_MARK names a file created when it hangs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import mpiml.checkpoint
import mpiml.trainer
from mpiml.train import main

AT = int(os.environ["MPIML_SLOWSAVE_AT"])
MARK = Path(os.environ["MPIML_SLOWSAVE_MARK"])
_saves = 0
_real_save = mpiml.trainer.save_checkpoint
_real_sha256 = mpiml.checkpoint._sha256


def _save(*args, **kwargs):
    global _saves
    _saves += 1
    return _real_save(*args, **kwargs)


def _sha256(path: Path) -> str:
    if _saves == AT:  # model.pt is on disk in the temporary folder: hang here
        MARK.write_text(str(path))
        time.sleep(3600)
    return _real_sha256(path)


mpiml.trainer.save_checkpoint = _save
mpiml.checkpoint._sha256 = _sha256

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

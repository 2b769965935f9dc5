"""Which samples calibrate an int8 model: ``--calibration-data``, else the first ``n`` of ``--data`` (the
verifier then uses the others), else the checkpoint's training split."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from folding.kinds import Prepared
from folding.programs import Options
from folding.source import load_samples

logger = logging.getLogger(__name__)


def calibration_samples(prepared: Prepared, opts: Options, n: int) -> tuple[np.ndarray | None, str]:
    """(samples, where they came from) for int8; (None, "") when there are none."""
    if opts.calibration_data:
        return _from_file(opts.calibration_data, prepared, n, verifying=False)
    if opts.data:
        return _from_file(opts.data, prepared, n, verifying=True)
    return prepared.calibration(n) if prepared.calibration else (None, "")


def _from_file(data: str, prepared: Prepared, n: int, verifying: bool) -> tuple[np.ndarray, str]:
    """The first ``n`` samples of the file calibrate; with --data (``verifying``) the verifier skips them when
    there are more (the source record says how many), else the two share them."""
    x, _ = load_samples(data, prepared.record.input_shape, 1 << 30, np.float32)
    name = Path(data).name
    if not verifying:
        return x[:n], f"{min(n, len(x))} samples of {name}"
    if len(x) > n:
        prepared.record.data_skip = n
        return x[:n], f"the first {n} of {len(x)} samples of {name} (verification uses the other {len(x) - n})"
    logger.warning("Options.data has %d samples, not more than FoldRequest.calibration_samples %d: calibration and "
                   "verification "
                   "use the same samples", len(x), n)
    return x, f"all {len(x)} samples of {name} (also the verification samples)"

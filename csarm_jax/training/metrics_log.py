"""Metrics to ``workdir/metrics.jsonl`` and TensorBoard event files (``workdir/tensorboard``).

A resumed run replays the steps after its checkpoint: ``MetricsLog(workdir, resumed_at=step)``
drops the records of those steps from ``metrics.jsonl``, marks the resume point there
(``{"step": step, "resumed": true}``) and has TensorBoard purge its later events, so no curve is
drawn twice. A non-finite value (a diverged loss) is written to ``metrics.jsonl`` as ``null``, so
the file stays strict JSON.
"""
from __future__ import annotations

import json
import math
import os
import time


def drop_after(path: str, step: int) -> int:
  """Rewrites the JSON-lines file at ``path`` without records of steps after ``step`` (and without
  a torn last line); returns how many records were dropped."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:           # a line cut short by the kill
        dropped += 1
        continue
      if record.get('step', 0) > step:
        dropped += 1
      else:
        kept.append(line if line.endswith('\n') else line + '\n')
  with open(path + '.tmp', 'w') as f:
    f.writelines(kept)
  os.replace(path + '.tmp', path)
  return dropped


class MetricsLog:
  def __init__(self, workdir: str, enabled: bool = True, resumed_at: int | None = None):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter
      path = os.path.join(workdir, 'metrics.jsonl')
      if resumed_at is not None:
        dropped = drop_after(path, resumed_at)
      self._jsonl = open(path, 'a')
      purge = None if resumed_at is None else resumed_at + 1
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=purge)
      if resumed_at is not None:
        self._append({'step': resumed_at, 'time': time.time(), 'resumed': True,
                      'dropped_records': dropped})

  def _append(self, record: dict) -> None:
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in record.items()}
    self._jsonl.write(json.dumps(record, allow_nan=False) + '\n')
    self._jsonl.flush()

  def write(self, step: int, values: dict[str, float], prefix: str) -> None:
    if not self.enabled:
      return
    self._append({'step': step, 'time': time.time(),
                  **{f'{prefix}/{k}': v for k, v in values.items()}})
    for k, v in values.items():
      self._tb.add_scalar(f'{prefix}/{k}', v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()

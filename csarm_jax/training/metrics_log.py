"""Metrics to ``workdir/metrics.jsonl`` and TensorBoard event files (``workdir/tensorboard``)."""
from __future__ import annotations

import json
import os
import time


class MetricsLog:
  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, values: dict[str, float], prefix: str) -> None:
    if not self.enabled:
      return
    record = {'step': step, 'time': time.time(), **{f'{prefix}/{k}': v for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(f'{prefix}/{k}', v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()

"""The study's report: ``summary.md`` tables and PNG figures, computed from ``results.csv`` alone
(plus ``embedding.csv`` for the feature-space figure).

Rows of an extra section or a benchmark variant are reported as methods of their own
('cs_arm_bn [strength1.3]'); means and stds pool benchmark seeds x folds x training seeds, and
``spread`` splits the spread between benchmark realisations and training seeds."""
from __future__ import annotations

import os
import textwrap
from typing import Sequence

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from csarm_jax.study.runner import BASE, MAIN_SECTION  # noqa: E402

# Settings reported together: the main section's (trained on every lab but one) and the
# within-source section's (trained on one lab, the paper's headline setting).
SETTING_GROUPS = {'Accuracy by method and setting': ('in_domain', 'unseen_batches',
                                                     'unseen_source'),
                  'Within one lab (the paper\'s within-source setting)': ('new_plates',
                                                                        'new_batches')}
SETTING_LABELS = {'in_domain': 'unseen plates (in-domain)', 'unseen_batches': 'unseen batches',
                  'unseen_source': 'unseen source (cross-lab)',
                  'new_plates': 'new plates of its lab', 'new_batches': 'new batches of its lab'}
METHOD_LABELS = {'erm': 'ERM', 'adabn': 'AdaBN', 'adabn_controls': 'AdaBN + controls', 'ben': 'BEN',
                 'arm_bn': 'ARM-BN', 'arm_bn_controls': 'ARM-BN + test controls',
                 'cs_arm_bn': 'CS-ARM-BN', 'arm_cml': 'ARM-CML', 'cs_arm_cml': 'CS-ARM-CML',
                 'tent': 'TENT', 'deyo': 'DeYO', 'roid': 'ROID', 'dann': 'DANN',
                 'coral': 'Deep CORAL'}
METHOD_COLORS = dict(zip(METHOD_LABELS, plt.get_cmap('tab20').colors))   # one colour per method
KEYS = ['method', 'setting', 'sweep', 'sweep_value']


def labelled(results: pd.DataFrame) -> pd.DataFrame:
  """``results`` with rows of an extra section or benchmark variant named as methods of their own:
  'erm [wide]', 'cs_arm_bn [strength1.3]'."""
  def tag(column: str, main: str) -> pd.Series:
    return results[column].astype(str).map(lambda v: '' if v == main else f' [{v}]')
  return results.assign(method=results['method'] + tag('section', MAIN_SECTION) +
                        tag('benchmark', BASE),
                        sweep_value=results['sweep_value'].fillna('').astype(str))


def method_label(method: str) -> str:
  """'tent@cs_arm_bn [strength1.3]' -> 'TENT from CS-ARM-BN [strength1.3]'."""
  name, _, tags = method.partition(' ')
  base, _, source = name.partition('@')
  label = METHOD_LABELS.get(base, base)
  if source:
    label += f' from {METHOD_LABELS.get(source, source)}'
  return f'{label} {tags}' if tags else label


def _color(method: str):
  return METHOD_COLORS.get(method.partition(' ')[0].partition('@')[0])


def aggregate(results: pd.DataFrame, metric: str = 'accuracy') -> pd.DataFrame:
  """mean, sample std (ddof=1) and n over benchmark seeds x folds x seeds per
  method/setting/sweep/value (methods as ``labelled`` names them)."""
  g = labelled(results).groupby(KEYS, sort=False)[metric]
  out = pd.DataFrame({'mean': g.mean(), 'std': g.std(ddof=1).fillna(0.0), 'n': g.size()})
  return out.reset_index()


def spread(results: pd.DataFrame, metric: str = 'accuracy') -> pd.DataFrame:
  """Where the spread comes from, per method/setting/sweep/value: ``between``, the sample std over
  benchmark seeds of each benchmark's mean over its runs (folds x training seeds); ``within``, the
  mean over benchmark seeds of the sample std over each benchmark's runs. NaN where undefined (one
  benchmark seed; one run per benchmark)."""
  per = labelled(results).groupby(KEYS + ['benchmark_seed'], sort=False)[metric].agg(
      ['mean', 'std'])
  out = per.groupby(KEYS, sort=False).agg(between=('mean', 'std'), within=('std', 'mean'),
                                          benchmarks=('mean', 'size'))
  return out.reset_index()


def _cell(row) -> str:
  return f"{row['mean']:.3f} ± {row['std']:.3f} (n={int(row['n'])})"


def _spread_cell(row) -> str:
  return ' / '.join('—' if pd.isna(row[k]) else f'{row[k]:.3f}' for k in ('between', 'within'))


def _pivot(agg: pd.DataFrame, columns: str, order: Sequence[str],
           methods: Sequence[str], cell=_cell) -> pd.DataFrame:
  table = agg.assign(cell=agg.apply(cell, axis=1)).pivot(index='method', columns=columns,
                                                        values='cell')
  table = table.reindex(index=[m for m in methods if m in table.index],
                        columns=[c for c in order if c in table.columns]).fillna('—')
  return table.rename(index=method_label)


def _markdown(table: pd.DataFrame, first: str) -> str:
  header = f'| {first} | ' + ' | '.join(map(str, table.columns)) + ' |'
  lines = [header, '|' + '---|' * (len(table.columns) + 1)]
  lines += [f'| {i} | ' + ' | '.join(map(str, r)) + ' |' for i, r in table.iterrows()]
  return '\n'.join(lines)


def _sweep(agg: pd.DataFrame, sweep: str, setting: str, balanced: bool = False) -> pd.DataFrame:
  rows = agg[(agg['sweep'] == sweep) & (agg['setting'] == setting)]
  if balanced:        # the default protocol is the 'balanced' end of the label-shift axis
    base = (agg[(agg['sweep'] == 'none') & (agg['setting'] == setting)]
            .assign(sweep_value='balanced'))
    rows = pd.concat([base, rows])
  return rows


def _sweep_order(values) -> list[str]:
  numeric = sorted({v for v in values if v != 'balanced'}, key=float)
  if 'balanced' in set(values):
    return ['balanced'] + sorted(numeric, key=float, reverse=True)
  return numeric


def summary_markdown(results: pd.DataFrame, paper: pd.DataFrame, sweep_setting: str,
                     command: str) -> str:
  methods = list(dict.fromkeys(labelled(results)['method']))
  agg = aggregate(results)
  parts = [
      '# CS-ARM-BN reproduction study', '',
      f'Regenerate: `{command}`', '',
      'Accuracy = fraction of perturbed test images classified correctly (8 classes), mean ± '
      f'sample std over n runs: {_runs_note(results)}. Computed from `results.csv`. '
      'Rows tagged [name] come from a benchmark variant or an extra section.', '']
  for title, table in setting_tables(agg, methods):
    parts += [f'## {title}', '', _markdown(table, 'method'), '']
  for sweep, title, balanced in (('label_shift', 'Label shift: Dirichlet α of each test context',
                                  True),
                                 ('perturbed', 'Perturbed images per test context', False),
                                 ('controls', 'DMSO controls per test context', False)):
    rows = _sweep(agg, sweep, sweep_setting, balanced)
    if len(rows):
      table = _pivot(rows, 'sweep_value', _sweep_order(rows['sweep_value']), methods)
      parts += [f'## {title} ({SETTING_LABELS[sweep_setting]})', '', _markdown(table, 'method'), '']
  parts += spread_markdown(results, sweep_setting, methods)
  parts += ['## The paper beside ours', '', paper_comparison_markdown(agg, paper), '']
  return '\n'.join(parts)


def spread_markdown(results: pd.DataFrame, sweep_setting: str, methods: Sequence[str]) -> list[str]:
  """The spread decomposition's tables: by setting, and along the label-shift sweep."""
  s = spread(results)
  parts = ['## Where the spread comes from', '',
           'Each cell: σ between benchmarks / σ within a benchmark. σ between: sample std over '
           'benchmark seeds of each benchmark\'s mean accuracy; σ within: mean over benchmark '
           'seeds of the sample std over that benchmark\'s runs (folds × training seeds). — where '
           'undefined: one benchmark seed, or one run per benchmark (then the σ between also holds '
           'the training seed\'s noise, which one run cannot separate).', '']
  for _, table in setting_tables(s, methods, _spread_cell):
    parts += [_markdown(table, 'method'), '']
  rows = _sweep(s, 'label_shift', sweep_setting, balanced=True)
  if len(rows):
    table = _pivot(rows, 'sweep_value', _sweep_order(rows['sweep_value']), methods, _spread_cell)
    parts += [f'Label shift (Dirichlet α, {SETTING_LABELS[sweep_setting]}):', '',
              _markdown(table, 'method'), '']
  return parts


def setting_tables(agg: pd.DataFrame, methods: Sequence[str], cell=_cell
                   ) -> list[tuple[str, pd.DataFrame]]:
  """(title, method x setting table) per group of SETTING_GROUPS that has rows, without sweeps."""
  out = []
  for title, settings in SETTING_GROUPS.items():
    rows = agg[(agg['sweep'] == 'none') & agg['setting'].isin(settings)]
    if len(rows):
      table = _pivot(rows, 'setting', settings, methods, cell)
      table.columns = [SETTING_LABELS[c] for c in table.columns]
      out.append((title, table))
  return out


def paper_comparison_markdown(agg: pd.DataFrame, paper: pd.DataFrame) -> str:
  merged = paper.merge(agg, on=['method', 'setting', 'sweep', 'sweep_value'], how='left')
  lines = ['| paper claim | paper | ours (method, setting) |', '|---|---|---|']
  for _, r in merged.iterrows():
    ours = '—' if pd.isna(r['mean']) else _cell(r)
    std = '' if pd.isna(r['paper_std']) else f" ± {r['paper_std']:.3f}"
    where = f"{method_label(r['method'])}, {SETTING_LABELS[r['setting']]}"
    if r['sweep'] != 'none':
      where += f", {r['sweep'].replace('_', ' ')} {r['sweep_value']}"
    lines.append(f"| {r['paper_claim']} | {r['paper_mean']:.3f}{std} | {ours} ({where}) |")
  return '\n'.join(lines)


def _runs_note(results: pd.DataFrame) -> str:
  n = [results[c].nunique() for c in ('benchmark_seed', 'fold', 'seed')]
  return f'{n[0]} benchmark seeds × {n[1]} folds × {n[2]} training seeds'



def plot_settings(results: pd.DataFrame, path: str) -> None:
  """Bars per setting, one panel per group of SETTING_GROUPS that has rows (its methods only)."""
  order = list(dict.fromkeys(labelled(results)['method']))
  agg = aggregate(results)
  agg = agg[agg['sweep'] == 'none']
  groups = [(title, [s for s in settings if s in set(agg['setting'])])
            for title, settings in SETTING_GROUPS.items()]
  groups = [(title, settings) for title, settings in groups if settings]
  fig, axes = plt.subplots(1, len(groups), figsize=(4 + 2.2 * sum(len(s) for _, s in groups), 4.2),
                           dpi=100, squeeze=False,
                           gridspec_kw={'width_ratios': [len(s) for _, s in groups]})
  handles = {}
  for ax, (title, settings) in zip(axes[0], groups):
    rows = agg[agg['setting'].isin(settings)]
    methods = [m for m in order if m in set(rows['method'])]
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
      r = rows[rows['method'] == m].set_index('setting').reindex(settings)
      handles[m] = ax.bar(np.arange(len(settings)) + i * width, r['mean'], width, yerr=r['std'],
                          capsize=2, label=method_label(m), color=_color(m),
                          hatch='//' if ' [' in m else None)
    ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2)
    ax.set_xticklabels([textwrap.fill(SETTING_LABELS[s], 16) for s in settings], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(textwrap.fill(title, 40), fontsize=9)
  axes[0, 0].set_ylabel('accuracy (fraction of images)')
  fig.suptitle(f'Accuracy by setting; mean ± std over {_runs_note(results)}', fontsize=9)
  labels = [m for m in order if m in handles]
  axes[0, -1].legend([handles[m] for m in labels], [method_label(m) for m in labels], fontsize=7,
                     ncol=1 + len(labels) // 16, loc='upper left',
                     bbox_to_anchor=(1.02, 1.0))    # beside the axes: never over a bar
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_sweep(results: pd.DataFrame, sweep: str, setting: str, xlabel: str, path: str,
               log_x: bool = False) -> None:
  agg = aggregate(results)
  rows = _sweep(agg, sweep, setting, balanced=sweep == 'label_shift')
  if not len(rows):
    return
  order = _sweep_order(rows['sweep_value'])
  methods = list(dict.fromkeys(rows['method']))
  columns = 1 + len(methods) // 16
  fig, ax = plt.subplots(figsize=(5.0 + 1.9 * columns, 3.6), dpi=100)
  for m in methods:
    r = rows[rows['method'] == m].set_index('sweep_value').reindex(order)   # unscored: a gap
    x = list(range(len(order))) if not log_x else [float(v) for v in order]
    ax.errorbar(x, r['mean'], yerr=r['std'], marker='o', capsize=2, label=method_label(m),
                color=_color(m), linestyle='--' if ' [' in m else '-')
  if log_x:
    ax.set_xscale('symlog', linthresh=1)
    values = [float(v) for v in order]
    ax.set_xticks(values)
    ax.set_xticklabels(order)
  else:
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order)
  ax.set_xlabel(xlabel)
  ax.set_ylabel('accuracy (fraction of images)')
  ax.set_ylim(0, 1)
  ax.set_title(f'{SETTING_LABELS[setting]}\nmean ± std over {_runs_note(results)}', fontsize=9)
  ax.legend(fontsize=7, ncol=columns, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_embedding(embedding: pd.DataFrame, class_names: Sequence[str], path: str) -> None:
  """2 x methods panels: the 2-D projection of penultimate features coloured by source and class."""
  methods = list(dict.fromkeys(embedding['method']))
  fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 7.4), dpi=100,
                           squeeze=False)
  sources = sorted(embedding['Metadata_Source'].unique())
  for j, m in enumerate(methods):
    e = embedding[embedding['method'] == m]
    for i, (column, names) in enumerate((('Metadata_Source', sources),
                                         ('label', list(range(len(class_names)))))):
      ax = axes[i, j]
      cmap = plt.get_cmap('tab10')
      for k, value in enumerate(names):
        sel = e[e[column] == value]
        label = value if column == 'Metadata_Source' else class_names[value]
        ax.scatter(sel['pc1'], sel['pc2'], s=4, alpha=0.6, color=cmap(k % 10), label=label)
      ax.set_title(f"{method_label(m)}: by {'source' if i == 0 else 'class'} "
                   f'(n={len(e)} images)', fontsize=9)
      ax.set_xlabel(f"PC1 ({e['pc1_var'].iloc[0]:.0%} of variance)")
      ax.set_ylabel(f"PC2 ({e['pc2_var'].iloc[0]:.0%} of variance)")
      ax.legend(fontsize=6, markerscale=2, loc='best')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write(workdir: str, paper: pd.DataFrame, sweep_setting: str, command: str,
          class_names: Sequence[str] | None = None) -> str:
  """summary.md and the figures from workdir/results.csv (and embedding.csv if present)."""
  results = pd.read_csv(os.path.join(workdir, 'results.csv'), dtype={'sweep_value': str})
  results['sweep_value'] = results['sweep_value'].fillna('')
  text = summary_markdown(results, paper, sweep_setting, command)
  plot_settings(results, os.path.join(workdir, 'accuracy_by_setting.png'))
  plot_sweep(results, 'label_shift', sweep_setting, 'Dirichlet α of test contexts (small = skewed)',
             os.path.join(workdir, 'accuracy_vs_label_shift.png'))
  plot_sweep(results, 'perturbed', sweep_setting, 'perturbed images per test context',
             os.path.join(workdir, 'accuracy_vs_context_size.png'), log_x=True)
  plot_sweep(results, 'controls', sweep_setting, 'DMSO controls per test context',
             os.path.join(workdir, 'accuracy_vs_controls.png'), log_x=True)
  embedding_path = os.path.join(workdir, 'embedding.csv')
  if os.path.exists(embedding_path) and class_names is not None:
    plot_embedding(pd.read_csv(embedding_path), class_names, os.path.join(workdir, 'embedding.png'))
    text += ('\n## Feature space\n\n![embedding](embedding.png)\n\nPCA of penultimate features '
             'of held-out images, without adaptation (ERM, running statistics) and with CS-ARM-BN '
             'adaptation (each plate normalised with its own context and controls).\n')
  with open(os.path.join(workdir, 'summary.md'), 'w') as f:
    f.write(text)
  return text

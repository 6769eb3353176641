"""Every example the README shows works as written, and every command it (or an entry point's
docstring) shows would start.

Commands are found, not listed, so one added later is checked too: every ``python ...`` in the
shell blocks and inline code of README.md and in the module docstrings of experiments/ and
data_prep/, and every inline ``--config.*`` override in README.md. Each is checked in-process,
without running it: the shell accepts it (bash and zsh), its script exists, its flags and
--config overrides parse against the real entry point and config file, the config's variant exists
and passes the run's config checks, and the repository files it names exist (data paths are the
user's, made by earlier commands or their own). The main commands then run end to end on the tiny
store, with run_fixture's tiny config given as --config flags.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import os
import re
import shlex
import sys
import types
from typing import Iterator

import ml_collections
import pandas as pd
import pytest
from absl import app, flags
from ml_collections import config_flags

from csarm_jax.study import runner as study
from csarm_jax.training import experiment
from run_fixture import tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'experiments'))
from configs import reproduce as reproduce_config  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), '..'))
ENTRY_DIRS = ('experiments', 'data_prep')
SOURCE_DIRS = ('csarm_jax', 'data_prep', 'docs', 'experiments', 'tests')   # paths in the repo
SHELL_OPERATORS = re.compile(r'^[;&|<>()]+$')
PYTHON_LINE = re.compile(r'^\s*(\w+=\S*\s+)*python3?\s')      # a docstring line holding a command
FENCE = re.compile(r'^```(\w*)\n(.*?)^```', re.M | re.S)


@dataclasses.dataclass(frozen=True)
class Command:
  where: str           # file:line
  text: str            # the shell text it came from
  argv: tuple          # ('python', script or '-m', ...)


def _tokens(text: str) -> list[str]:
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def _commands(where: str, text: str) -> Iterator[Command]:
  """The python commands of one logical shell line."""
  segment: list[str] = []
  for token in _tokens(text) + [';']:
    if not SHELL_OPERATORS.match(token):
      segment.append(token)
      continue
    while segment and re.match(r'^\w+=', segment[0]):    # VAR=value python ...
      segment.pop(0)
    if segment and segment[0] in ('python', 'python3'):
      yield Command(where, text, tuple(segment))
    segment = []


def _logical_lines(text: str, first_line: int) -> Iterator[tuple[int, str]]:
  """(line number, line with its backslash continuations joined)."""
  start, pending = first_line, ''
  for number, line in enumerate(text.split('\n'), first_line):
    if not pending:
      start = number
    if line.rstrip().endswith('\\'):
      pending += line.rstrip()[:-1] + ' '
      continue
    yield start, pending + line
    pending = ''


def _markdown_snippets(name: str) -> Iterator[tuple[str, str, bool]]:
  """(where, shell text, is inline code) of a markdown file's shell blocks and inline code."""
  text = open(os.path.join(ROOT, name)).read()
  for block in FENCE.finditer(text):
    if block.group(1) not in ('', 'bash', 'sh', 'shell', 'console'):
      continue
    first = text.count('\n', 0, block.start(2)) + 1
    for number, line in _logical_lines(block.group(2), first):
      yield f'{name}:{number}', line, False
  prose = FENCE.sub(lambda m: '\n' * m.group(0).count('\n'), text)   # keeps line numbers
  for code in re.finditer(r'`([^`]+)`', prose):
    line = prose.count('\n', 0, code.start()) + 1
    yield f'{name}:{line}', code.group(1).replace('\n', ' '), True


def _entry_points() -> list[str]:
  return sorted(os.path.join(d, f) for d in (*ENTRY_DIRS, 'experiments/configs')
                for f in os.listdir(os.path.join(ROOT, d)) if f.endswith('.py'))


def _docstring_snippets(path: str) -> Iterator[tuple[str, str]]:
  with open(os.path.join(ROOT, path)) as f:
    tree = ast.parse(f.read())
  if not (tree.body and isinstance(tree.body[0], ast.Expr) and
          isinstance(tree.body[0].value, ast.Constant)):
    return
  for number, line in _logical_lines(tree.body[0].value.value, tree.body[0].lineno):
    if PYTHON_LINE.match(line):
      yield f'{path}:{number}', line


def readme_commands() -> list[Command]:
  return [c for where, text, _ in _markdown_snippets('README.md') for c in _commands(where, text)]


def all_commands() -> list[Command]:
  docstrings = [c for path in _entry_points() for where, text in _docstring_snippets(path)
                for c in _commands(where, text)]
  return readme_commands() + docstrings


def config_fragments() -> list[tuple[str, str]]:
  """Inline README code made only of --config.* overrides, e.g. `--config.eval.whole_plate=true`."""
  return [(where, text) for where, text, inline in _markdown_snippets('README.md')
          if inline and all(t.startswith('--config.') for t in _tokens(text))]


# --- checks that run nothing ----------------------------------------------------------------------

def _check_shell_accepts(where: str, text: str) -> None:
  """Unquoted ( ) are a bash syntax error; unquoted [ ] * ? a zsh 'no matches found'."""
  unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", '', text)
  unquoted = re.sub(r'(^|\s)#.*', '', unquoted)
  bad = sorted(set(re.findall(r'[()\[\]*?]', unquoted)))
  assert not bad, f'{where}: quote the argument holding {bad}: {text}'


def _check_repo_paths(command: Command) -> None:
  for token in command.argv[1:]:
    for value in token.split('=', 1)[-1].split(','):
      path = re.sub(r'(\.py):\w+$', r'\1', value)              # a config's :variant
      if path.split('/')[0] in SOURCE_DIRS:
        assert os.path.exists(os.path.join(ROOT, path)), f'{command.where}: no {path}'


def _in_entry_dirs(module) -> bool:
  path = getattr(module, '__file__', None) or ''
  return path.startswith(tuple(os.path.join(ROOT, d) + os.sep for d in ENTRY_DIRS))


@contextlib.contextmanager
def entry_point(argv: tuple, monkeypatch) -> Iterator[tuple]:
  """Runs a script as __main__ up to ``app.run`` and parses ``argv`` with its flags; yields (main,
  its argv, {name: config} of its config flags). Afterwards its flags are removed, and the flags
  that an import of an entry point by another test defined (they would clash) are back."""
  script = os.path.join(ROOT, argv[0])
  fv = flags.FLAGS
  stashed = [(module, flag) for module, module_flags in fv.flags_by_module_dict().items()
             if _in_entry_dirs(sys.modules.get(module)) for flag in module_flags]
  for _, flag in stashed:
    delattr(fv, flag.name)
  before_flags, before_modules = set(fv), set(sys.modules)
  mains = []
  monkeypatch.setattr(app, 'run', lambda main, *args, **kwargs: mains.append(main))
  monkeypatch.setattr(sys, 'argv', list(argv))        # config_flags reads its overrides there
  monkeypatch.syspath_prepend(os.path.dirname(script))
  try:
    module = types.ModuleType('__main__')
    module.__file__ = script
    exec(compile(open(script).read(), script, 'exec'), module.__dict__)
    assert len(mains) == 1, f'{argv[0]} does not end in app.run(main)'
    rest = fv(list(argv))
    configs = {name: fv[name].value for name in set(fv) - before_flags
               if isinstance(fv[name].value, ml_collections.ConfigDict)}
    yield mains[0], rest, configs
  finally:
    for name in set(fv) - before_flags:
      delattr(fv, name)
    for name in set(sys.modules) - before_modules:     # experiments/ helpers define flags again
      if _in_entry_dirs(sys.modules[name]):
        del sys.modules[name]
    for module_name, flag in stashed:
      fv[flag.name] = flag
      fv.register_flag_by_module(module_name, flag)


def _check_config(where: str, config: ml_collections.ConfigDict) -> None:
  try:
    if 'experiment' in config:                          # the study's config
      experiment.check_config(config.experiment)
      study.training_groups(list(config.methods) + list(config.embedding.methods))
    elif 'method' in config:
      experiment.check_config(config)
  except ValueError as e:
    pytest.fail(f'{where}: {e}')


@pytest.mark.parametrize('command', all_commands(), ids=lambda c: c.where)
def test_command_would_start(command, monkeypatch):
  _check_shell_accepts(command.where, command.text)
  _check_repo_paths(command)
  if command.argv[1] == '-m':
    module = command.argv[2]
    assert importlib.util.find_spec(module), f'{command.where}: no module {module}'
    return
  assert command.argv[1].split('/')[0] in ENTRY_DIRS, f'{command.where}: not an entry point'
  with entry_point(command.argv[1:], monkeypatch) as (_, rest, configs):
    assert rest[1:] == [], f'{command.where}: unexpected arguments {rest[1:]}'
    for config in configs.values():
      _check_config(command.where, config)


@pytest.mark.parametrize('where,text', config_fragments(), ids=[w for w, _ in config_fragments()])
def test_config_override_parses_against_a_config(where, text):
  """An override shown alone must parse against at least one config of experiments/configs."""
  _check_shell_accepts(where, text)
  errors = []
  for name in sorted(os.listdir(os.path.join(ROOT, 'experiments', 'configs'))):
    if name.startswith('_') or not name.endswith('.py'):
      continue
    path = os.path.join(ROOT, 'experiments', 'configs', name)
    argv = ['prog', f'--config={path}', *_tokens(text)]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, flag_values=fv, sys_argv=argv)
    try:
      fv(argv)
      return
    except Exception as e:       # noqa: BLE001 -- every config refused it: report them all
      errors.append(f'{name}: {e}')
  pytest.fail(f'{where}: {text!r} parses against no config:\n' + '\n'.join(errors))


def test_names_the_readme_gives_exist():
  """Every csarm_jax.module.attribute it names imports; every csarm_jax/ path exists."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  for path in set(re.findall(r'\bcsarm_jax/[\w/.]*\w', text)):
    assert os.path.exists(os.path.join(ROOT, path)), f'README.md: no {path}'
  names = set(re.findall(r'\bcsarm_jax(?:\.\w+)+', text))
  assert 'csarm_jax.training.train_and_evaluate' in names
  for name in sorted(names):
    parts = name.split('.')
    for split in range(len(parts), 0, -1):          # the longest importable module, then attributes
      if importlib.util.find_spec('.'.join(parts[:split])) is not None:
        break
    value = importlib.import_module('.'.join(parts[:split]))
    for attribute in parts[split:]:
      assert hasattr(value, attribute), f'README.md: {name}: no {attribute} in {value.__name__}'
      value = getattr(value, attribute)


def test_commands_are_found():
  """The extraction itself: the README's main commands and a docstring's are among those checked."""
  scripts = {c.argv[1] for c in readme_commands()}
  assert {'experiments/train.py', 'experiments/export.py', 'experiments/predict.py',
          'experiments/cross_validate.py', 'experiments/reproduce.py',
          'data_prep/make_synthetic.py', '-m'} <= scripts
  assert any(c.where.startswith('experiments/configs/jumpcp.py') for c in all_commands())
  assert "'--config.eval.label_shift_alphas=(0.1,0.01)'" in {t for _, t in config_fragments()}


# --- the main commands, run end to end on the tiny store ----------------------------------------

def _as_flags(config: ml_collections.ConfigDict, prefix: str) -> list[str]:
  """--config flags setting every field of ``config`` but its method (the command's variant)."""
  out = []
  for key, value in config.items():
    name = f'--{prefix}.{key}'
    if key == 'method' or value is None:
      continue
    if isinstance(value, ml_collections.ConfigDict) and key != 'options':
      out += _as_flags(value, f'{prefix}.{key}')
    elif isinstance(value, ml_collections.ConfigDict):
      out.append(f'{name}={value.to_dict()!r}')          # a whole dict: keys may be new
    elif isinstance(value, tuple):
      out.append(f'{name}={value!r}')
    else:
      out.append(f'{name}={value}')
  return out


def _unsettable_fields(config: ml_collections.ConfigDict, prefix: str) -> list[str]:
  """Fields holding None without a type: the command line cannot set them."""
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += _unsettable_fields(value, f'{prefix}.{key}')
    elif value is None and not _typed_placeholder(config, key):
      out.append(f'{prefix}.{key}')
  return out


def _typed_placeholder(config: ml_collections.ConfigDict, key: str) -> bool:
  try:
    return config.get_ref(key).get_type() is not type(None)
  except ValueError:                     # a plain None: ConfigDict makes no reference to it
    return False


@pytest.mark.parametrize('name', ['default.py', 'quickstart.py', 'quickstart.py:erm', 'jumpcp.py',
                                  'jumpcp.py:ben', 'reproduce.py:quick', 'reproduce.py:full'])
def test_every_config_field_can_be_set_from_the_command_line(name):
  """The README's promise: each field, set on the command line to its own value, parses back to
  the same config (tuples, dicts and typed None placeholders included)."""
  path = os.path.join(ROOT, 'experiments', 'configs', name)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=fv, sys_argv=['prog'])
  fv(['prog', f'--config={path}'])
  config = fv.config
  assert _unsettable_fields(config, 'config') == []
  argv = ['prog', f'--config={path}', *_as_flags(config, 'config')]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=fv, sys_argv=argv)
  fv(argv)
  assert fv.config.to_dict() == config.to_dict()
  assert len(fv['config'].override_values) >= 40


def _tiny_flags(store: str, prefix: str) -> list[str]:
  # synthetic.preset is None in the tiny config: '' builds nothing either, the store exists
  config = tiny_config(store)
  config.train.update(max_epochs=1, steps_per_epoch=1, checkpoint_every_steps=0)   # one update
  return _as_flags(config, prefix) + [f'--{prefix}.synthetic.preset=']


def _first(commands: list[Command], script: str, **flag_values) -> Command:
  for command in commands:
    if command.argv[1] == f'experiments/{script}' and all(
        f'--{k}={v}' in command.argv for k, v in flag_values.items()):
      return command
  pytest.fail(f'the README shows no {script} command with {flag_values}')


def _flag(command: Command, name: str) -> str:
  return next(t.split('=', 1)[1] for t in command.argv if t.startswith(f'--{name}='))


def _run(command: Command, extra: list[str], monkeypatch) -> None:
  with entry_point(command.argv[1:] + tuple(extra), monkeypatch) as (main, rest, _):
    main(rest)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
  """A working directory where the README's relative paths resolve: code linked, data fresh."""
  for name in ENTRY_DIRS:
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  monkeypatch.chdir(tmp_path)
  return tmp_path


def test_main_readme_commands_run_on_the_tiny_store(sandbox, store_path, monkeypatch):
  commands = readme_commands()
  tiny = _tiny_flags(store_path, 'config')
  # export reads a run the README trains; predict reads exports and a store
  export = _first(commands, 'export.py')
  train = _first(commands, 'train.py', workdir=_flag(export, 'workdir'))
  _run(train, tiny, monkeypatch)
  assert os.path.exists(os.path.join(_flag(train, 'workdir'), 'results.json'))
  _run(export, [], monkeypatch)
  predict = _first(commands, 'predict.py')
  stand_ins = {path: os.path.abspath(_flag(export, 'out'))   # an ensemble of the one export
               for path in _flag(predict, 'export').split(',')}
  stand_ins[_flag(predict, 'store')] = store_path
  for path, target in stand_ins.items():
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
      os.symlink(target, path)
  _run(predict, [], monkeypatch)
  images = pd.read_parquet(os.path.join(_flag(predict, 'out'), 'images.parquet'))
  assert len(images) > 0 and images.filter(like='prob_').notna().all().all()

  cross = _first(commands, 'cross_validate.py')
  _run(cross, tiny + ['--folds=0', '--seeds=0'], monkeypatch)
  assert os.path.exists(os.path.join(_flag(cross, 'workdir'), 'cross_validation.csv'))

  study_flags = ['--config.methods=cs_arm_bn', '--config.seeds=0',
                 '--config.sweeps.label_shift_alphas=0.01', '--config.sweeps.perturbed=4',
                 '--config.sweeps.controls=4', '--config.sweeps.max_images_per_plate=4',
                 '--config.embedding.methods=cs_arm_bn',
                 '--config.embedding.max_images_per_plate=4',
                 '--config.experiment.split.unseen_batches_fraction=0.3',
                 '--compilation_cache=',            # no process-wide XLA cache in the suite
                 "--config.benchmark_seeds=(0,)"] + [   # a fixture store: one realisation, and
                 f"--config.sections.{name}.benchmark_seeds=()"     # the main section alone
                 for name in reproduce_config.get_config('quick').sections]
  reproduce = _first(commands, 'reproduce.py')
  _run(reproduce, _tiny_flags(store_path, 'config.experiment') + study_flags, monkeypatch)
  results = pd.read_csv(os.path.join(_flag(reproduce, 'workdir'), 'results.csv'))
  assert set(results['setting']) == {'in_domain', 'unseen_batches', 'unseen_source'}
  assert os.path.exists(os.path.join(_flag(reproduce, 'workdir'), 'summary.md'))


def test_readme_api_example_runs():
  text = open(os.path.join(ROOT, 'README.md')).read()
  blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
  assert blocks, 'the README has no python example'
  namespace = {}
  exec(compile(blocks[0], 'README.md', 'exec'), namespace)
  assert namespace['batched'].shape == (2, 16, 8)
  assert namespace['logits'].shape == (16, 8)

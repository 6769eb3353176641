"""Training: the experiment built from a config, state, the sharded step, checkpoints, the loop."""
from csarm_jax.training.experiment import ConfigError
from csarm_jax.training.loop import Preempted, train_and_evaluate
from csarm_jax.training.state import TrainState, abstract_state, create_state
from csarm_jax.training.step import check_microbatch, compile_train_step, make_train_step

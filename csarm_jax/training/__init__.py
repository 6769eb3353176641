"""Training: state, the sharded step, checkpoints and the loop."""
from csarm_jax.training.sharding import (context_sharded, global_batch, make_mesh,
                                         maybe_initialize_distributed, replicate, replicated)
from csarm_jax.training.state import TrainState, create_state
from csarm_jax.training.step import (compile_eval_step, compile_train_step, make_eval_step,
                                     make_train_step, masked_cross_entropy)

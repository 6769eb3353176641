"""AdaBN: trained as ERM; at test, statistics of the test context (with or without its controls)."""
from csarm_jax.methods.base import Method

ADABN = Method('adabn', train_sampling='mixed', train_controls=False, eval_controls=False,
               running_stats=True)
ADABN_CONTROLS = Method('adabn_controls', train_sampling='mixed', train_controls=False,
                        eval_controls=True, running_stats=True)

"""The loss of a few 2:4 search steps of SmolLM2-135M on one batch, per learning rate and rate.

    python docs/results/lm_smollm2_lr_probe.py LR RATE MOMENTUM

Prints, for each of 8 search steps (learning rate cosine to 0 over them), the loss of the masks
before the step's update and the mask entries the step flipped. Behind the learning rate of
`configs/lm_smollm2.py` (`docs/results/lm_smollm2_lr_probe.txt`).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jackpots_jax as jj
from jackpots_jax import models
from jackpots_jax.data.tokenizer import Tokenizer
from jackpots_jax.io import llama_weights
from jackpots_jax.models import llama

lr, rate, momentum = (float(x) for x in sys.argv[1:4])
path = llama_weights.smollm2_gguf_path()
tokenizer = Tokenizer.from_gguf(path)
text = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. " * 3
ids = np.array([tokenizer.bos_id, *tokenizer.encode(text)], np.int32)[: 2 * 17].reshape(2, 17)
batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((2, 16), np.float32)}
network = models.network("smollm2_135m", tokenizer.vocab_size)
variables, _, _ = llama_weights.import_for_model(path, "smollm2_135m", tokenizer.vocab_size)
params = jax.tree.map(jnp.asarray, variables["params"])
budget = jj.layer_budgets(params, 0.5, "uniform", dense=llama.DENSE, pattern="2:4")
scores, _ = jj.init_scores(params, budget, "magnitude")
tx = jj.search_optimizer(
    budget, learning_rate=lr, momentum=momentum, weight_decay=0.0, total_steps=8, rate=rate
)
state = jj.engine.create_search_state(scores, tx)
step = jax.jit(
    lambda s, p, b: jj.engine.search_step(
        s, p, b, apply_fn=network.apply_fn, tx=tx, loss_fn=jj.losses.next_token(), inputs="inputs"
    )
)
for i in range(8):
    state, out = step(state, params, batch)
    print(i, float(out["loss"]), int(out["churn"]), flush=True)

"""jackpots_jax: lottery jackpots (sparse masks over frozen pre-trained weights) in JAX."""

"""Evaluation numbers: generative perplexity under an autoregressive scorer (`gen_ppl`,
`scorer`), paired bootstrap intervals (`bootstrap`) and the NELBO bound of a checkpoint
(`nelbo_bound`)."""

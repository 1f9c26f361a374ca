"""Evaluation: generative perplexity under an autoregressive scorer (`gen_ppl`, `scorer`), the
NELBO bound of a checkpoint (`test_ppl`), and the figures and pages a person reads
(`plots`, `report`)."""

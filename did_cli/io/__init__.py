"""Reading and writing things: tokenizers, text sources, prepared data, checkpoint folders,
sample records and the output files every command writes."""

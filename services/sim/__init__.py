"""Simulated users, labelers and the gold preference they share.

- `tasks`: the task suite (prompt templates with checkable constraints) and
  the deterministic gold scorer `gold_score(prompt, response)`.
- `users`: a skewed population of simulated users who log prompts through
  the real FeedbackService.
- `labelers`: simulated labelers who work the LabelingService queue: they
  write demonstrations, and score, flag and rank K samples with noise around
  the gold preference (`run_labelers`).
- `stats`: the confidence intervals of the evaluation.
- `report`: held-out evaluation against the gold scorer and the demo report.

One round of the loop, as `make demo` drives it:

    population = make_population(seed)                  # users, labelers, prompts
    population.write_tokens(path)                       # -> RLHF_TOKENS_FILE for the stack
    submit_prompts(feedback_channel, population)        # LogPrompt, one token per user
    run_labelers(labeling_channel, population.labelers, 120,
                 kind="demonstration")                  # -> build a snapshot, train SFT, promote it
    run_labelers(labeling_channel, population.labelers, 200,
                 kind="comparison")                     # ranks samples of the serving policy
    labeling_stats(labeling_channel, token)             # measured labeler agreement
    write_report(settings, out_dir, base_version=..., sft_version=..., ppo_version=...,
                 rm_version=..., snapshot_id=..., run_dirs={...}, extra={...})
"""

"""Simulated users, labelers and the gold preference they share.

- `tasks`: the task suite (prompt templates with checkable constraints) and
  the deterministic gold scorer `gold_score(prompt, response)`.
- `users`: a skewed population of simulated users who log prompts through
  the real FeedbackService.
- `labelers`: simulated labelers who write demonstrations and rank K
  samples from the real PolicyService by gold score.
- `stats`: the confidence intervals of the evaluation.
- `report`: held-out evaluation against the gold scorer and the demo report.

One round of the loop, as `make demo` drives it:

    population = make_population(seed)                  # users, labelers, prompts
    population.write_tokens(path)                       # -> RLHF_TOKENS_FILE for the stack
    submit_prompts(feedback_channel, population)        # LogPrompt, one token per user
    pool = LabelerPool(population, feedback_channel, policy_channel,
                       prompts=read_prompt_events(settings), seed=seed)
    pool.demonstrate(120)                               # -> build a snapshot, train SFT, promote it
    pool.compare(200, k=4, max_new_tokens=48)           # ranks samples of the serving policy
    write_report(settings, out_dir, base_version=..., sft_version=..., ppo_version=...,
                 rm_version=..., snapshot_id=..., run_dirs={...}, extra={...})
"""

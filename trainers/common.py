"""Moved: trainers/common.py was split by subject (config.py, job.py, nn.py, report.py).

Kept only so that code not yet updated still imports (services/sim/report.py
reads plot_curves from here); import from the new modules, and delete this
file once nothing imports it.
"""

from trainers.config import JobError, build_config, require  # noqa: F401 - re-exported for old importers
from trainers.job import Job, epoch_order, global_batch, lr_at, peak_rss_gb, run_main, step_seed  # noqa: F401 - idem
from trainers.nn import (  # noqa: F401 - re-exported for old importers
    WeightEMA,
    add_lora,
    all_reduce_,
    autocast,
    load_trainable_state,
    merge_lora,
    sum_over_ranks,
    trainable_state,
    unwrap,
)
from trainers.report import markdown_report, plot_curves  # noqa: F401 - re-exported for old importers

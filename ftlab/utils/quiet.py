"""A run's console is ftlab's own: third-party chatter that says nothing about the run is dropped, anything else
still shows.

Dropped (measured on a default `ftlab run`, transformers 5.25, peft 0.21, bitsandbytes installed by a dependency):
- bitsandbytes' CPU backend asking the `kernels` package for a hub kernel at import, and both of their warnings
  that the hub is offline (two WARNING lines before anything else);
- transformers' weight-loading and shard-writing progress bars (ftlab draws its own bars);
- transformers' deprecation of `is_gradient_checkpointing`, which peft 0.21's `get_peft_model` reads.

ftlab's KV-cache decoding and scoring pass transformers' current `cache=` keyword (not the deprecated
`past_key_values`), so that deprecation is not silenced: if it shows, something still uses the old keyword.
"""

from __future__ import annotations

import logging
import warnings

_DEPRECATED = (r".*`is_gradient_checkpointing` is deprecated",)


def quiet_third_party() -> None:
    """Call before torch/transformers are imported (idempotent)."""
    for name in ("kernels", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in _DEPRECATED:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

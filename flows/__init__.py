"""One Prefect flow per stage (`python -m flows.<stage>`), plus `pipeline.py` that chains them."""
import os

# Defaults for the embedded Prefect API (set before prefect is imported; the environment wins):
# no telemetry from machines without a network, and time for the ephemeral server on a 2-core machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("REFINERY_WARM_START"):  # a pipeline run offers a warm interpreter: refinery/ops/warm_start.py
    from refinery.ops.warm_start import maybe_delegate

    maybe_delegate()  # returns only when this process should run the stage itself (a cold start)

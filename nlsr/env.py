"""Run-time environment defaults: offline, no telemetry. Applied by the CLI and the Prefect tasks."""
import os

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    # A temporary Prefect API server can take 7-19 s to start on a busy 2-core machine (default timeout 20 s).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",  # trl/transformers must not open MLflow runs of their own
    "WANDB_DISABLED": "true",
}


def offline_defaults() -> None:
    """Set the offline / no-telemetry variables unless the user set them already."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)

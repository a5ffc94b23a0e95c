"""MLflow tracking: the project store, provenance, and a run handler that always ends its run."""

from .handler import MLflowRunHandler, capture_executed_config, config_params
from .provenance import collect_provenance, data_hashes, git_info, new_run_name, package_versions, runtime_info
from .store import TrackingError, check_tracking_uri, init_tracking_store, project_root, resolve_tracking_uri

__all__ = [
    "MLflowRunHandler", "capture_executed_config", "config_params", "collect_provenance", "data_hashes", "git_info",
    "new_run_name", "package_versions", "runtime_info", "TrackingError", "check_tracking_uri", "init_tracking_store",
    "project_root", "resolve_tracking_uri",
]

"""Batch jobs: JSONL manifests run locally or against a server, resumable and shardable."""

from accel_diffusion.batch.manifest import BatchItem, PlannedRequest, read_manifest
from accel_diffusion.batch.outputs import BatchOutputs
from accel_diffusion.batch.runner import BatchReport, LocalBackend, ServerBackend, run_batch

__all__ = ["BatchItem", "BatchOutputs", "BatchReport", "LocalBackend", "PlannedRequest", "ServerBackend",
           "read_manifest", "run_batch"]

"""The compress stage: one job (`CompressJob`) run by one loop (`run_compress`) over a model
source (in memory, streamed from disk, or one rank of several), and the report it writes."""

from slimkit.compression.job import CompressJob, run_compress

__all__ = ["CompressJob", "run_compress"]

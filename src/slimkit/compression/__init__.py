"""The compress stage: one job (`CompressJob`) run by one loop (`run_compress`) over a model
source (in memory, streamed from disk, or one rank of several), the report it writes, and the
pack stage that turns an output into packed formats (`pack_dir.py`)."""

from slimkit.compression.job import CompressJob, run_compress

__all__ = ["CompressJob", "run_compress"]

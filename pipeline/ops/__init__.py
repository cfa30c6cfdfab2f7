"""What runs the pipeline: jobs, sensors and schedules, the UI launcher, screenshots, the summary,
recovery after a crash. The code location itself is pipeline.definitions."""

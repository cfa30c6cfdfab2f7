"""What every stage shares: atomic writes, fingerprints, the record layout, secrets, the MLflow
client that survives outages, a pool's limit held by lock files. Imports nothing from pipeline.stages or
pipeline.ops."""

"""What every stage shares: atomic writes, fingerprints, the record layout, secrets, the MLflow
client that survives outages. Imports nothing from pipeline.stages or pipeline.ops."""

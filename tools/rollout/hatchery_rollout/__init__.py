"""hatchery-rollout: upgrade a fleet in growing-concurrency steps."""

"""The comparison servers: ceiling, floor and naive baseline."""

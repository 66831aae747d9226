"""Live delivery: one blocking reader per replica fanned out to followers."""

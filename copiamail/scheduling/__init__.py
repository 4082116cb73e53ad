"""Which job goes next: the scheduler, the limits and the jobs waiting for a slot."""

"""`fraqat-plan`: a run's memory, time and cost before it is launched."""

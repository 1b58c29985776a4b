"""fraqat-train and fraqat-plan: the student, distillation, schedules applied, checkpoints, the run."""
